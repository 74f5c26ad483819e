"""How much quantization changes the default model's answers: greedy agreement and first-token
logprob deltas against an unquantized reference, on held-out prompts (none of them appear in
the tests).

.venv/bin/python -P bench/quant_quality.py [--reference float32] [--tokens 32]
    [--schemes int8,w8a8,gguf,bf16]

For each scheme, against the reference run (same prompts, chat template, greedy):
- first token: share of prompts whose first greedy token equals the reference's;
- |d logprob|: mean and max, over prompts, of how far the quantized model's logprob of the
  reference's first token is from the reference's own (the prompt plus that token, scored with
  prompt_logprobs, so it is exact even when the token is not the quantized model's choice);
- prefix: mean number of leading tokens (of --tokens) equal to the reference's, and the share
  of prompts whose whole output is identical.
"bf16" as a scheme runs the unquantized model in bfloat16: the yardstick of how far a mere
change of float format moves the output.
"""

from __future__ import annotations

import argparse
import statistics
import time

from splitserve import LLM, SamplingParams

HELD_OUT = [
    "Write a haiku about autumn leaves.",
    "What is the boiling point of water at sea level in Fahrenheit?",
    "Give me three tips for a good night's sleep.",
    "Translate 'good morning, how are you?' into Spanish.",
    "Explain what a hash table is to a beginner.",
    "Write a Python function that reverses a string.",
    "Who wrote the play Romeo and Juliet?",
    "Summarize the water cycle in two sentences.",
    "What are the primary colors?",
    "Suggest a name for a bakery that sells only croissants.",
    "How many legs does a spider have?",
    "Write a short apology email for missing a meeting.",
    "What is the difference between weather and climate?",
    "List four planets in our solar system.",
    "Explain recursion using a simple example.",
    "What does a thermometer measure?",
    "Describe the taste of a lemon.",
    "Why do we have seasons on Earth?",
    "Write a SQL query that counts the rows of a table named users.",
    "What is 15 percent of 80?",
    "Give a one-sentence definition of photosynthesis.",
    "What should I pack for a weekend camping trip?",
    "Name a famous painting by Leonardo da Vinci.",
    "How do I make a cup of green tea?",
    "What is the capital of Japan?",
    "Write two lines of a poem about the sea.",
    "Explain what an API is in simple terms.",
    "What is the largest mammal on Earth?",
    "Give an example of a renewable energy source.",
    "How can I improve my handwriting?",
    "What is the opposite of 'generous'?",
    "Write a JavaScript snippet that logs the numbers 1 to 5.",
]


def run(llm: LLM, prompts: list[list[int]], tokens: int) -> tuple[list[list[int]], list[float]]:
    """Greedy outputs, and the logprob of each output's first token (from the output itself)."""
    params = SamplingParams(temperature=0.0, max_tokens=tokens, logprobs=0)
    outs = [o.outputs[0] for o in llm.generate(prompts, params)]
    return [list(o.token_ids) for o in outs], [o.logprobs[0].logprob for o in outs]


def score(llm: LLM, prompts: list[list[int]], first_tokens: list[int]) -> list[float]:
    """The model's logprob of ``first_tokens[i]`` right after prompt i."""
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    extended = [p + [t] for p, t in zip(prompts, first_tokens, strict=True)]
    return [o.prompt_logprobs[-1].logprob for o in llm.generate(extended, params)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", default="float32", help="dtype of the unquantized run")
    parser.add_argument("--schemes", default="int8,w8a8,gguf,bf16")
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    ref_llm = LLM(dtype=args.reference, enable_prefix_caching=False)
    prompts = [ref_llm.apply_chat_template([{"role": "user", "content": p}]) for p in HELD_OUT]
    t0 = time.perf_counter()
    ref_out, ref_lp = run(ref_llm, prompts, args.tokens)
    print(f"reference {args.reference}: {time.perf_counter() - t0:.1f} s")
    del ref_llm
    rows = []
    for scheme in args.schemes.split(","):
        if scheme == "bf16":
            llm = LLM(dtype="bfloat16", enable_prefix_caching=False)
        else:
            llm = LLM(dtype=args.reference, quantization=scheme, enable_prefix_caching=False)
        out, _ = run(llm, prompts, args.tokens)
        lp = score(llm, prompts, [o[0] for o in ref_out])
        deltas = [abs(a - b) for a, b in zip(lp, ref_lp, strict=True)]
        prefix = []
        for a, b in zip(out, ref_out, strict=True):
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            prefix.append(n)
        rows.append(
            (
                scheme,
                sum(a[0] == b[0] for a, b in zip(out, ref_out, strict=True)) / len(out),
                statistics.mean(deltas),
                max(deltas),
                statistics.mean(prefix),
                sum(a == b for a, b in zip(out, ref_out, strict=True)) / len(out),
            )
        )
        del llm
    print(f"\n{len(prompts)} held-out chat prompts, {args.tokens} greedy tokens, "
          f"reference: unquantized {args.reference}\n")  # fmt: skip
    print("| scheme | first token = ref | mean abs d logprob | max abs d logprob | "
          f"mean equal prefix (of {args.tokens}) | identical outputs |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, first, mean_d, max_d, pre, same in rows:
        print(f"| {name} | {first:.0%} | {mean_d:.3f} | {max_d:.3f} | {pre:.1f} | {same:.0%} |")


if __name__ == "__main__":
    main()
