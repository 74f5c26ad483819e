"""`splitserve generate`: offline generation from the command line."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2)")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user message")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--stop", action="append", default=[])
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")


def run(args: argparse.Namespace) -> int:
    from splitserve import LLM, SamplingParams

    try:
        params = SamplingParams(
            n=args.n,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            max_tokens=args.max_tokens,
            stop=tuple(args.stop),
        )
    except ValueError as exc:
        print(f"splitserve generate: {exc}", file=sys.stderr)
        return 2
    try:
        llm = LLM(model=args.model, dtype=args.dtype)
        if args.chat:
            outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
        else:
            outputs = llm.generate(args.prompt, params)
    except ValueError as exc:
        print(f"splitserve generate: {exc}", file=sys.stderr)
        return 2
    for prompt, out in zip(args.prompt, outputs, strict=True):
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": prompt,
                        "outputs": [
                            {
                                "text": o.text,
                                "token_ids": o.token_ids,
                                "finish_reason": o.finish_reason,
                            }
                            for o in out.outputs
                        ],
                    }
                )
            )
        else:
            for o in out.outputs:
                print(f"{prompt}{o.text}")
    return 0
