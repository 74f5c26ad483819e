"""`splitserve fetch-model`: make the default (or given) model ready in the local cache."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2)")


def run(args: argparse.Namespace) -> int:
    from splitserve.engine.model.loader import resolve_model

    print(resolve_model(args.model))
    return 0
