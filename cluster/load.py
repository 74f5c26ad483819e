"""Streaming load against an OpenAI endpoint, for the cluster scenarios and bench/autoscale.py.

``stream_counted`` sends one streamed completion (``ignore_eos``, so it runs to ``max_tokens``)
and records what a load test judges: when it began and ended, time to first token, mean gap
between tokens, completion tokens in the final usage, finish reason, and any error (a failure is
a result, never raised). ``Clients`` runs client threads that send such requests back to back;
how many of them send at a time can change while it runs (``set_clients``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import openai


@dataclass
class Streamed:
    prompt: str
    began: float
    ended: float
    tokens: int | None  # completion tokens in the final usage
    finish: str | None
    error: str | None
    ttft: float | None = None  # seconds from sending to the first text
    itl: float | None = None  # mean gap between texts after the first

    def complete(self, max_tokens: int) -> bool:
        """No error, every token there, ended by its length (what ``ignore_eos`` asks for)."""
        return self.error is None and self.tokens == max_tokens and self.finish == "length"


def stream_counted(sdk: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> Streamed:
    """One streamed completion with its usage and timings."""
    began = time.monotonic()
    tokens = finish = error = None
    stamps: list[float] = []
    try:
        chunks = sdk.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        for chunk in chunks:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            if any(c.text for c in chunk.choices):
                stamps.append(time.monotonic())
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
    except Exception as exc:  # noqa: BLE001 - every failure is counted
        error = f"{type(exc).__name__}: {exc}"
    result = Streamed(prompt, began, time.monotonic(), tokens, finish, error)
    if stamps:
        result.ttft = stamps[0] - began
        if len(stamps) > 1:
            result.itl = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return result


class Clients:
    """Client threads streaming back to back; ``set_clients(n)``: the first ``n`` send, the rest
    wait. A context manager: ``stop`` on exit waits for the requests in flight."""

    def __init__(
        self,
        sdk: openai.OpenAI,
        model: str,
        prompts: Sequence[str],
        max_tokens: int,
        count: int = 0,
    ) -> None:
        self.sdk, self.model, self.prompts, self.max_tokens = sdk, model, prompts, max_tokens
        self.target = 0
        self.inflight = 0
        self.results: list[Streamed] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._done = threading.Event()
        self.set_clients(count)

    def set_clients(self, n: int) -> None:
        self.target = n
        while len(self._threads) < n:
            t = threading.Thread(target=self._client, args=(len(self._threads),), daemon=True)
            self._threads.append(t)
            t.start()

    def _client(self, k: int) -> None:
        i = 0
        while not self._done.is_set():
            if k >= self.target:
                time.sleep(0.2)
                continue
            prompt = f"{self.prompts[(k + i) % len(self.prompts)]} {k}-{i}"
            with self._lock:
                self.inflight += 1
            result = stream_counted(self.sdk, self.model, prompt, self.max_tokens)
            with self._lock:
                self.inflight -= 1
                self.results.append(result)
            i += 1

    def stop(self, timeout: float = 600.0) -> None:
        self._done.set()
        for t in self._threads:
            t.join(timeout=timeout)

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
