"""The `splitserve` console script.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
Only the chosen subcommand's module is imported, so `splitserve operator` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("splitserve.engine.entrypoints.generate", "offline generation"),
    "fetch-model": (
        "splitserve.engine.entrypoints.fetch_model",
        "convert the default model into the local safetensors cache",
    ),
    "pull-model": (
        "splitserve.storage.pull",
        "download hf:// or s3:// weights into a folder (the pods' download step)",
    ),
    "serve": ("splitserve.serve", "run router, prefill and decode locally"),
    "router": ("splitserve.services.router.main", "run the OpenAI-compatible router"),
    "prefill": ("splitserve.services.prefill.main", "run a prefill gRPC server"),
    "decode": ("splitserve.services.decode.main", "run a decode gRPC server"),
    "operator": ("splitserve.operator.cli", "run or render the Kubernetes operator"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: splitserve <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from splitserve import __version__

        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"splitserve: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"splitserve {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
