"""Tool calls. A forced call (`tool_choice` "required" or a named function) is generated under a JSON schema of
{"name": ..., "arguments": {...}} built from the tools' parameter schemas, so it always parses, with any model.
With `tool_choice: auto` the model decides; its reply is searched for calls in the format chat templates with
tool support teach: `<tool_call>{"name": ..., "arguments": ...}</tool_call>` (Hermes, Qwen), or a reply that is
one such JSON object (Llama 3)."""
from __future__ import annotations

import json
import re
import uuid

CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


def supports_tools(template: str) -> bool:
    """Whether a chat template renders `tools` (one that never mentions them would drop them silently)."""
    return "tools" in (template or "")


def call_schema(tools: list[dict], choice) -> dict:
    """The schema a forced call is generated under: one named function, or any of them ("required")."""
    def one(fn: dict) -> dict:
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                "required": ["name", "arguments"], "additionalProperties": False}

    fns = [t["function"] for t in tools if choice == "required" or t["function"]["name"] == choice]
    return one(fns[0]) if len(fns) == 1 else {"anyOf": [one(f) for f in fns]}


def as_call(obj: dict) -> dict:
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}}


PARTIAL = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*(?:,\s*"arguments"\s*:\s*(.*))?\Z', re.S)


def partial_call(text: str) -> dict | None:
    """A forced call that max_tokens cut short, as OpenAI's API returns one: the name once it is whole, and the
    arguments as far as they got (a string that does not parse); None while not even the name is whole."""
    m = PARTIAL.match(text)
    if m is None:
        return None
    return as_call({"name": json.loads(f'"{m.group(1)}"'), "arguments": (m.group(2) or "").rstrip()})


def parse_calls(text: str, names: set[str]) -> tuple[str, list[dict]]:
    """(content left over, tool calls) from a reply generated with tool_choice auto."""
    calls, rest = [], text
    for m in CALL.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("name") in names:
            calls.append(as_call(obj))
            rest = rest.replace(m.group(0), "")
    if not calls:
        try:
            obj = json.loads(text.strip())
        except ValueError:
            obj = None
        if isinstance(obj, dict) and obj.get("name") in names:
            return "", [as_call(obj)]
    return rest.strip(), calls
