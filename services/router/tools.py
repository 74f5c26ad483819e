"""Tools (function calling), request side: what ``tools`` / ``tool_choice`` ask for, the output
constraint a forced call decodes under, and the chat-template input (tools and tool turns).

``tool_choice``:

- ``"none"``: the template sees the tools; the output is plain content, never parsed.
- ``"auto"`` (the default with tools): free generation; ``tool_calls.py`` parses Hermes-style
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks out of it.
- ``"required"``: the output is constrained to ``{"name": one of the tools, "arguments": that
  tool's parameters}`` (a non-empty array of such with ``parallel_tool_calls``).
- ``{"type": "function", "function": {"name": N}}``: the output is constrained to N's
  ``parameters`` schema; the whole output is the call's arguments.

Models whose chat template ignores ``tools`` (SmolLM2's does) get the tools and the call format in
a system text instead, and their tool turns written as the Hermes tags, so "auto" has a chance.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import jsonschema

from splitserve.protocol.sampling import StructuredOutput

if TYPE_CHECKING:
    from splitserve.services.router.protocol import ChatMessage, NamedToolChoice, Tool

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

ToolMode = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True)
class ToolPlan:
    """A validated ``tools`` + ``tool_choice``: ``named`` is set exactly when mode is "named"."""

    mode: ToolMode
    tools: tuple[Tool, ...]
    named: str | None = None
    parallel: bool = True

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.function.name for t in self.tools)

    @property
    def forced(self) -> bool:
        """The output is constrained to be a call (no plain content possible)."""
        return self.mode in ("required", "named")

    def parameters(self, name: str) -> dict[str, Any]:
        """The JSON Schema of ``name``'s arguments (an empty object when it declares none)."""
        tool = next(t for t in self.tools if t.function.name == name)
        return tool.function.parameters or EMPTY_PARAMETERS

    def constraint(self) -> StructuredOutput | None:
        """The output constraint of a forced call; None for "auto" and "none"."""
        if self.mode == "named":
            return StructuredOutput(json_schema=_compact(self.parameters(self.named or "")))
        if self.mode != "required":
            return None
        calls = [
            {
                "type": "object",
                "properties": {"name": {"enum": [name]}, "arguments": self.parameters(name)},
                "required": ["name", "arguments"],
            }
            for name in self.names
        ]
        one: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
        schema = {"type": "array", "minItems": 1, "items": one} if self.parallel else one
        return StructuredOutput(json_schema=_compact(schema))

    def template_tools(self) -> list[dict[str, Any]]:
        """The tools as chat templates take them (OpenAI's JSON shape)."""
        out = []
        for t in self.tools:
            fn: dict[str, Any] = {"name": t.function.name}
            if t.function.description is not None:
                fn["description"] = t.function.description
            fn["parameters"] = t.function.parameters or EMPTY_PARAMETERS
            out.append({"type": "function", "function": fn})
        return out


def plan_tools(
    tools: Sequence[Tool] | None,
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None,
    parallel: bool = True,
) -> ToolPlan | None:
    """Validate ``tools`` / ``tool_choice``; raises ``ValueError`` whose message starts with the
    offending field (-> a 400 naming it)."""
    if not tools:
        if tool_choice is not None and tool_choice != "none":
            raise ValueError("tool_choice requires tools")
        return None
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if tool.function.name in seen:
            raise ValueError(f"tools has the function name {tool.function.name!r} twice")
        seen.add(tool.function.name)
        if tool.function.parameters is not None:
            _check_schema(tool.function.parameters, f"tools.{i}.function.parameters")
    if tool_choice is None or isinstance(tool_choice, str):
        return ToolPlan(tool_choice or "auto", tuple(tools), parallel=parallel)
    name = tool_choice.function.name
    if name not in seen:
        raise ValueError(f"tool_choice names the function {name!r}, which is not in tools")
    return ToolPlan("named", tuple(tools), named=name, parallel=parallel)


def _check_schema(schema: dict[str, Any], field: str) -> None:
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as err:
        raise ValueError(f"{field} is not a valid JSON Schema: {err.message}") from None


def _compact(schema: dict[str, Any]) -> str:
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


# ---- the chat template's input -----------------------------------------------------------------


def template_messages(messages: Sequence[ChatMessage], native: bool) -> list[dict[str, Any]]:
    """Messages as HF chat templates take them.

    ``native`` (the template renders ``tool_calls``): assistant calls go as ``tool_calls`` with
    the arguments as objects (what templates expect, as vLLM passes them) and tool results as
    ``role: tool`` with their ``tool_call_id``. Otherwise both are written as Hermes tags:
    the calls into the assistant's content, the results as a user turn in ``<tool_response>``.
    Raises ``ValueError`` naming the field.
    """
    out = []
    for i, m in enumerate(messages):
        msg: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name is not None:
            msg["name"] = m.name
        if m.role == "tool":
            if not m.tool_call_id:
                raise ValueError(f"messages.{i}.tool_call_id is required for role 'tool'")
            if native:
                msg["tool_call_id"] = m.tool_call_id
            else:
                msg = {"role": "user", "content": f"<tool_response>\n{m.text()}\n</tool_response>"}
        elif m.tool_calls:
            calls = []
            for j, call in enumerate(m.tool_calls):
                field = f"messages.{i}.tool_calls.{j}.function.arguments"
                args = _arguments(call.function.arguments, field)
                calls.append({"name": call.function.name, "arguments": args, "id": call.id})
            if native:
                msg["tool_calls"] = [
                    {"id": c.pop("id"), "type": "function", "function": c} for c in calls
                ]
            else:
                blocks = [hermes_block(c["name"], c["arguments"]) for c in calls]
                msg["content"] = "\n".join([msg["content"], *blocks] if msg["content"] else blocks)
        out.append(msg)
    return out


def _arguments(text: str, field: str) -> dict[str, Any]:
    try:
        args = json.loads(text) if text.strip() else {}
    except ValueError as err:
        raise ValueError(f"{field} is not valid JSON: {err}") from None
    if not isinstance(args, dict):
        raise ValueError(f"{field} must be a JSON object")
    return args


def hermes_block(name: str, arguments: dict[str, Any]) -> str:
    call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{call}\n</tool_call>"


def with_tool_system_text(messages: list[dict[str, Any]], plan: ToolPlan) -> list[dict[str, Any]]:
    """For templates that ignore ``tools``: list them and the call format in the system text
    (appended to the first system message, or a new one in front)."""
    listed = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in plan.template_tools())
    text = (
        "You can call these functions (their arguments as JSON Schema):\n"
        f"{listed}\n"
        "To call one, reply with only\n"
        '<tool_call>\n{"name": "<function name>", "arguments": {<arguments as JSON>}}\n'
        "</tool_call>\n"
        "Otherwise, reply normally."
    )
    if messages and messages[0]["role"] in ("system", "developer"):
        first = dict(messages[0], content=f"{messages[0]['content']}\n\n{text}")
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]
