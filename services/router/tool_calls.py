"""Tools (function calling), response side: the generated text -> OpenAI ``tool_calls``.

- "named": the whole output is the arguments (it was decoded under their schema), returned as
  generated, also streamed as argument deltas as the tokens come.
- "required": the output is ``{"name", "arguments"}`` JSON (a list of them with parallel calls).
- "auto": Hermes / Qwen ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (an
  unterminated last block too), or an output that is nothing but such a JSON object. Every block
  must name a known function with object arguments, else the whole text stays plain content.

A call ends the choice with finish reason "tool_calls" (unless ``max_tokens`` cut it: "length").
"required" and "auto" streams are buffered: their calls come in the final chunks.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from splitserve.services.router.tools import ToolPlan

_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)\Z", re.DOTALL)


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True)
class ParsedOutput:
    """Generated text split into plain content (None when empty) and calls."""

    content: str | None
    calls: tuple[ParsedCall, ...] = ()


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_auto(text: str, names: tuple[str, ...]) -> ParsedOutput:
    """Tool calls in free text (see the module docstring); plain content if there are none."""
    plain = ParsedOutput(text)
    matches = list(_BLOCK.finditer(text))
    if not matches:
        call = _call(text, names)
        return ParsedOutput(None, (call,)) if call is not None else plain
    calls = []
    for m in matches:
        call = _call(m.group(1) if m.group(1) is not None else m.group(2), names)
        if call is None:
            return plain
        calls.append(call)
    rest = _BLOCK.sub("", text).strip()
    return ParsedOutput(rest or None, tuple(calls))


def _call(text: str, names: tuple[str, ...]) -> ParsedCall | None:
    """One ``{"name", "arguments"}`` object naming a known function, else None."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


def parse_required(text: str, parallel: bool) -> ParsedOutput:
    """The constrained output of "required"; unparsable (cut by max_tokens) -> plain content."""
    try:
        obj = json.loads(text)
        items = obj if parallel else [obj]
        calls = tuple(
            ParsedCall(o["name"], json.dumps(o["arguments"], ensure_ascii=False)) for o in items
        )
    except (ValueError, KeyError, TypeError):
        return ParsedOutput(text)
    return ParsedOutput(None, calls) if calls else ParsedOutput(text)


def parse(plan: ToolPlan, text: str) -> ParsedOutput:
    if plan.mode == "named":
        return ParsedOutput(None, (ParsedCall(plan.named or "", text),))
    if plan.mode == "required":
        return parse_required(text, plan.parallel)
    if plan.mode == "auto":
        return parse_auto(text, plan.names)
    return ParsedOutput(text)


def _finish(parsed: ParsedOutput, finish: str | None) -> str | None:
    return "tool_calls" if parsed.calls and finish == "stop" else finish


def _call_json(call: ParsedCall, call_id: str) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def chat_message(
    plan: ToolPlan | None, text: str, finish: str | None
) -> tuple[dict[str, Any], str | None]:
    """The assistant message of a finished choice and its finish reason."""
    if plan is None:
        return {"role": "assistant", "content": text}, finish
    parsed = parse(plan, text)
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if parsed.calls:
        message["tool_calls"] = [_call_json(c, new_call_id()) for c in parsed.calls]
    return message, _finish(parsed, finish)


class ToolCallStream:
    """One streamed choice: text pieces in, OpenAI chat deltas out."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.call_id = new_call_id()
        self.started = False

    def feed(self, text: str, finish: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """The deltas for this piece (possibly none) and the finish reason to report."""
        self.text += text
        if self.plan.mode == "named":
            deltas = []
            if not self.started:
                self.started = True
                head = _call_json(ParsedCall(self.plan.named or "", ""), self.call_id)
                deltas.append({"tool_calls": [{"index": 0, **head}]})
            if text:
                deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
            return deltas, "tool_calls" if finish == "stop" else finish
        if finish is None:
            return [], None
        parsed = parse(self.plan, self.text)
        deltas = [{"content": parsed.content}] if parsed.content else []
        for k, call in enumerate(parsed.calls):
            call_id = self.call_id if k == 0 else new_call_id()
            deltas.append({"tool_calls": [{"index": k, **_call_json(call, call_id)}]})
        return deltas, _finish(parsed, finish)
