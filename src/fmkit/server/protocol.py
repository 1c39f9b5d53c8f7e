"""The OpenAI request bodies, checked field by field, and the errors in OpenAI's envelope.

Each check names the field (`param`) and says what was expected, with the status and string `code` the OpenAI
API uses: 400 `invalid_request_error` for a bad value, a missing field or a combination that is not supported,
404 `model_not_found`, 413 for a body over the limit. Fields the API has and fmkit cannot honour are refused, not
ignored; fields that only concern a hosted service's bookkeeping (`store`, `metadata`, `service_tier`, ...) are
accepted and have no effect. fmkit's own extras (`top_k`, `ignore_eos`, `keep_alive`) ride in the SDK's
`extra_body`.
"""
from __future__ import annotations

import json
import math

from .engine import Params

REQUIRED = object()
NUMBER = (int, float)
MAX_N = 128
BOOKKEEPING = {"store", "metadata", "service_tier", "user", "prompt_cache_key", "safety_identifier",
               "parallel_tool_calls"}
EXTRAS = {"top_k", "ignore_eos", "keep_alive"}
SAMPLING = {"model", "temperature", "top_p", "max_tokens", "stop", "n", "seed", "presence_penalty",
            "frequency_penalty", "logit_bias", "stream", "stream_options"}
CHAT_FIELDS = SAMPLING | BOOKKEEPING | EXTRAS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs",
                                                 "response_format", "tools", "tool_choice"}
COMPLETION_FIELDS = SAMPLING | BOOKKEEPING | EXTRAS | {"prompt", "echo", "logprobs", "best_of", "suffix"}
EMBEDDING_FIELDS = {"model", "input", "encoding_format", "dimensions", "user", "keep_alive"}
ROLES = {"system", "developer", "user", "assistant", "tool"}
MESSAGE_FIELDS = {"role", "content", "name", "tool_calls", "tool_call_id", "refusal"}
STREAM_OPTIONS = {"include_usage", "include_obfuscation"}


class APIError(Exception):
    """An error response: status, and OpenAI's {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


def _kind(kinds) -> str:
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "an array",
             dict: "an object"}
    if int in kinds and float in kinds:   # an integer is a number
        kinds = tuple(k for k in kinds if k is not int)
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def _shown(value) -> str:
    """A value as it was in the JSON body (true, 100.0, "hot"), cut to 60 characters."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def get(body: dict, name: str, kinds: tuple, default=None, lo=None, hi=None):
    """body[name] checked: one of `kinds` (bool is never a number here), within [lo, hi]; `default` if absent or
    null; REQUIRED makes it a 400 when absent."""
    value = body.get(name)
    if value is None:
        if default is REQUIRED:
            raise APIError(400, f"'{name}' is a required property", name, "missing_required_parameter")
        return default
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        raise invalid(f"'{name}' must be {_kind(kinds)}, got {_shown(value)}", name, "invalid_type")
    return within(value, name, lo, hi)


def within(value, name: str, lo=None, hi=None):
    """`value` if it lies in [lo, hi] (either may be None), else a 400 naming the field and the range. NaN, which
    every comparison lets through, is refused by name."""
    if isinstance(value, float) and math.isnan(value):
        raise invalid(f"'{name}' must be a number, got NaN", name)
    if lo is not None and value < lo or hi is not None and value > hi:
        bounds = f"between {lo} and {hi}" if lo is not None and hi is not None else \
            f"at least {lo}" if lo is not None else f"at most {hi}"
        raise invalid(f"'{name}' must be {bounds}, got {value}", name)
    return value


def unknown_fields(body: dict, allowed: set[str], where: str = "") -> None:
    """A 400 for the first field of `body` (at `where`) not in `allowed`."""
    extra = sorted(set(body) - allowed)
    if extra:
        raise invalid(f"unrecognized request argument supplied: {where}{extra[0]}", f"{where}{extra[0]}",
                      "unrecognized_argument")


def known_fields(body: dict, allowed: set[str]) -> None:
    """A request body's fields: none unknown, and `user`, the one bookkeeping field whose type matters (it ends up
    in logs and moderation records), a string."""
    unknown_fields(body, allowed)
    get(body, "user", (str,))


def no_lone_surrogates(body: dict) -> None:
    """A 400 naming the first string of the body (keys too) that holds half of a UTF-16 surrogate pair: JSON's
    \\ud800 escape parses into one, and it is not text that can be encoded, tokenized or stored."""
    todo = [(body, "")]
    while todo:
        value, where = todo.pop()
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for k, v in items:
            at = f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}" if where else str(k)
            for text in (k, v):
                if isinstance(text, str) and not _encodable(text):
                    raise invalid(f"{at} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), "
                                  "which is not valid text", at)
            if isinstance(v, (dict, list)):
                todo.append((v, at))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("'stop' must be a string or an array of strings", "stop", "invalid_type")
    if len(stops) > 4:
        raise invalid(f"'stop' takes at most 4 sequences, got {len(stops)}", "stop")
    return tuple(s for s in stops if s)


def params(body: dict, vocab: int, max_tokens: int | None, logprobs: int | None) -> Params:
    """The sampling fields every generating endpoint shares."""
    bias = get(body, "logit_bias", (dict,), {})
    logit_bias = {}
    for k, v in bias.items():
        if not str(k).lstrip("-").isdigit() or not 0 <= int(k) < vocab:
            raise invalid(f"logit_bias key {k!r} is not a token id of this model (0..{vocab - 1})", "logit_bias")
        if isinstance(v, bool) or not isinstance(v, NUMBER) or not -100 <= v <= 100:
            raise invalid(f"logit_bias values must be numbers between -100 and 100, got {v!r}", "logit_bias")
        logit_bias[int(k)] = float(v)
    temperature = get(body, "temperature", NUMBER, 1.0, 0, 2)
    top_p = get(body, "top_p", NUMBER, 1.0, 0, 1)
    top_k = get(body, "top_k", (int,), 0, 0)
    if top_p == 0:  # nothing but the most likely token
        top_p, top_k = 1.0, 1
    return Params(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), top_k=top_k,
                  seed=get(body, "seed", (int,), None, -(1 << 63), (1 << 63) - 1), stop=stop_strings(body),
                  presence_penalty=float(get(body, "presence_penalty", NUMBER, 0.0, -2, 2)),
                  frequency_penalty=float(get(body, "frequency_penalty", NUMBER, 0.0, -2, 2)),
                  logit_bias=logit_bias, logprobs=logprobs, ignore_eos=get(body, "ignore_eos", (bool,), False))


def streaming(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = get(body, "stream", (bool,), False)
    options = get(body, "stream_options", (dict,), None)
    if options is not None and not stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
    if options is not None:
        unknown_fields(options, STREAM_OPTIONS, "stream_options.")
    include = get(options or {}, "include_usage", (bool,), False)
    return stream, include


def messages(body: dict) -> list[dict]:
    msgs = get(body, "messages", (list,), REQUIRED)
    if not msgs:
        raise invalid("'messages' must hold at least one message", "messages", "empty_array")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(f"{where} must be an object", where, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise invalid(f"{where}.role must be one of {', '.join(sorted(ROLES))}, got {role!r}", f"{where}.role")
        unknown_fields(m, MESSAGE_FIELDS, f"{where}.")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            parts = []
            for j, part in enumerate(content):
                at = f"{where}.content[{j}]"
                if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise invalid(f"{at}: only text parts are supported, got {kind!r}", at)
                unknown_fields(part, {"type", "text"}, f"{at}.")
                if not isinstance(part.get("text"), str):
                    raise invalid(f"{at}.text must be a string", f"{at}.text",
                                  "invalid_type" if "text" in part else "missing_required_parameter")
                parts.append(part["text"])
            content = "".join(parts)
        if content is None and not (role == "assistant" and m.get("tool_calls")):
            raise invalid(f"{where}.content is required for a {role} message", f"{where}.content",
                          "missing_required_parameter")
        if content is not None and not isinstance(content, str):
            raise invalid(f"{where}.content must be a string or an array of text parts", f"{where}.content",
                          "invalid_type")
        if role == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise invalid(f"{where}.tool_call_id is required for a tool message, as a string", f"{where}.tool_call_id",
                          "missing_required_parameter")
        msg = {"role": "system" if role == "developer" else role, "content": content or ""}
        for key in ("name", "tool_calls", "tool_call_id"):
            if key in m:
                msg[key] = m[key]
        if msg.get("tool_calls"):  # templates expect arguments as objects
            msg["tool_calls"] = [_parsed_call(c, where) for c in msg["tool_calls"]]
        out.append(msg)
    return out


def _parsed_call(call, where: str) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise invalid(f"{where}.tool_calls: each call needs function.name", f"{where}.tool_calls")
    args = fn.get("arguments", "{}")
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        raise invalid(f"{where}.tool_calls: function.arguments is not JSON", f"{where}.tool_calls") from None
    return {"id": call.get("id", ""), "type": "function", "function": {"name": fn["name"], "arguments": args}}


def response_format(body: dict) -> dict | None | bool:
    """None: free text; True: any JSON object; a dict: the JSON schema the output must validate against."""
    fmt = get(body, "response_format", (dict,), None)
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return True
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise invalid("response_format.json_schema must be an object with a 'schema'", "response_format")
        return spec.get("schema") or {"type": "object"}
    raise invalid(f"response_format.type must be text, json_object or json_schema, got {fmt.get('type')!r}",
                  "response_format")


def tools(body: dict) -> tuple[list[dict], object]:
    """(tools, tool_choice): tool_choice is "none", "auto", "required" or a function name."""
    tool_list = get(body, "tools", (list,), [])
    for i, t in enumerate(tool_list):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str):
            raise invalid(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}", f"tools[{i}]")
        if not isinstance(fn.get("parameters", {}), dict):
            raise invalid(f"tools[{i}].function.parameters must be a JSON schema object", f"tools[{i}]")
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if tool_list else "none"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if choice.get("type") != "function" or not isinstance(name, str):
            raise invalid("tool_choice must be none, auto, required or {'type': 'function', 'function': "
                          "{'name': ...}}", "tool_choice")
        if name not in [t["function"]["name"] for t in tool_list]:
            raise invalid(f"tool_choice names function {name!r}, which is not in 'tools'", "tool_choice")
        return tool_list, name
    if choice not in ("none", "auto", "required"):
        raise invalid(f"tool_choice must be none, auto, required or a function, got {choice!r}", "tool_choice")
    if choice != "none" and not tool_list:
        raise invalid(f"tool_choice {choice!r} needs 'tools'", "tool_choice")
    return tool_list, choice


def completion_prompts(body: dict, vocab: int) -> list[str | list[int]]:
    """`prompt` as a string, an array of strings, an array of token ids or an array of arrays of them."""
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(400, "'prompt' is a required property", "prompt", "missing_required_parameter")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                     for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and all(
            isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
        prompts = list(prompt)
    else:
        raise invalid("'prompt' must be a string, an array of strings, an array of token ids or an array of "
                      "arrays of token ids (none empty)", "prompt", "invalid_type")
    for p in prompts:
        if isinstance(p, list) and not all(0 <= t < vocab for t in p):
            raise invalid(f"'prompt' holds token ids outside this model's vocabulary (0..{vocab - 1})", "prompt")
    return prompts
