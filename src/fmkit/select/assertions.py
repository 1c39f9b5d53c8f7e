"""Assertions on one output, reference scores, and the reasons an answer counts as a failure.

A suite row's `assert` is a list of one-key mappings, each with options beside it:

    {"equals": "Paris", "ignore_case": true}     the whole output (stripped) equals the value
    {"contains": "Paris"}                        the value, or every value of a list, occurs in the output
    {"regex": "^\\d+$"}                          re.search finds the pattern
    {"json_schema": {...}}                       the output (a ```json fence allowed) is JSON valid for the schema
    {"python": "len(output) < 80"}              an expression, or code defining check(output, row), run in the
                                                 sandbox; true passes
    {"max_tokens": 50}                           the answer used at most this many completion tokens
    {"latency_ms": 1500}                         the answer came within this many milliseconds
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field

from ..errors import FmkitError

OPTIONS = {"equals": {"ignore_case"}, "contains": {"ignore_case"}, "regex": {"ignore_case"}, "json_schema": set(),
           "python": {"timeout_s"}, "max_tokens": set(), "latency_ms": set()}
KINDS = tuple(OPTIONS)

REFUSAL = re.compile(r"^\W*(i'?m sorry|i am sorry|sorry, (but )?i|i can(no|')?t (help|assist|do|provide|comply|"
                     r"answer)|i cannot|i won'?t|i am unable|i'm unable|as an ai\b)", re.I)


@dataclass
class Check:
    kind: str
    value: object
    options: dict = field(default_factory=dict)


def parse_check(spec, where: str) -> Check:
    """One assertion from a suite row, checked now so that a mistake names its file:line."""
    if not isinstance(spec, dict):
        raise FmkitError(f"{where}: each assertion must be a mapping like {{\"contains\": \"text\"}}, got {spec!r}")
    kinds = [k for k in spec if k in OPTIONS]
    if len(kinds) != 1:
        unknown = [k for k in spec if k not in OPTIONS and k not in set().union(*OPTIONS.values())]
        what = f"unknown assertion '{unknown[0]}'" if unknown else "an assertion needs exactly one kind"
        raise FmkitError(f"{where}: {what} (known: {', '.join(KINDS)})")
    kind = kinds[0]
    value, options = spec[kind], {k: v for k, v in spec.items() if k != kind}
    extra = set(options) - OPTIONS[kind]
    if extra:
        raise FmkitError(f"{where}: {kind} takes no option '{sorted(extra)[0]}'"
                         + (f" (options: {', '.join(sorted(OPTIONS[kind]))})" if OPTIONS[kind] else ""))
    if kind in ("max_tokens", "latency_ms") and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        raise FmkitError(f"{where}: {kind} takes a number, got {value!r}")
    if kind == "contains" and not (isinstance(value, str) or (isinstance(value, list) and value
                                                                and all(isinstance(v, str) for v in value))):
        raise FmkitError(f"{where}: contains takes a string or a list of strings, got {value!r}")
    if kind in ("equals", "regex", "python") and not isinstance(value, str):
        raise FmkitError(f"{where}: {kind} takes a string, got {value!r}")
    if kind == "regex":
        try:
            re.compile(value)
        except re.error as e:
            raise FmkitError(f"{where}: regex {value!r} does not compile ({e})") from None
    if kind == "python":
        try:
            compile(value, where, "exec")
        except SyntaxError as e:
            raise FmkitError(f"{where}: python check has a syntax error ({e.msg})") from None
    if kind == "json_schema":
        if not isinstance(value, dict):
            raise FmkitError(f"{where}: json_schema takes a JSON Schema object, got {value!r}")
        validator = _validator(value, where)
        try:
            validator.check_schema(value)
        except Exception as e:
            raise FmkitError(f"{where}: the json_schema is not a valid schema ({str(e).splitlines()[0]})") from None
    return Check(kind, value, options)


def _validator(schema: dict, where: str = ""):
    try:
        import jsonschema
    except ImportError:
        raise FmkitError(f"{where}: json_schema assertions need the jsonschema package: pip install jsonschema") \
            from None
    return jsonschema.validators.validator_for(schema)


def parse_json(text: str):
    """The JSON value in an output, allowing a Markdown code fence around it; raises ValueError if none."""
    t = text.strip()
    fence = re.match(r"^```(?:json)?\s*\n(.*?)\n?```$", t, re.S)
    return json.loads(fence.group(1) if fence else t)


def python_program(check: Check, output: str, row: dict) -> str:
    """The sandboxed program for a python check: the user's code, then its verdict printed as JSON."""
    code = check.value
    defines = re.search(r"^def check\s*\(", code, re.M)
    call = "check(output, row)" if defines else f"({code.strip()})"
    return (f"import json\noutput = json.loads({json.dumps(json.dumps(output))})\n"
            f"row = json.loads({json.dumps(json.dumps(row, default=str))})\n"
            + (code + "\n" if defines else "")
            + f"print('\\n__verdict__' + json.dumps(bool({call})))\n")


def python_key(check: Check, output: str, row: dict) -> str:
    return hashlib.sha256(python_program(check, output, row).encode()).hexdigest()


def run_check(check: Check, answer: dict, python_verdicts: dict, row: dict) -> dict:
    """{kind, passed (True / False / None when it cannot be judged), detail} for one answer."""
    out = answer.get("output")
    if out is None:
        return {"kind": check.kind, "passed": False, "detail": "no output"}
    case = re.I if check.options.get("ignore_case") else 0
    k, v = check.kind, check.value
    if k == "equals":
        a, b = out.strip(), v.strip()
        return _verdict(k, (a.lower() == b.lower()) if case else a == b)
    if k == "contains":
        wanted = [v] if isinstance(v, str) else v
        missing = [w for w in wanted if (w.lower() not in out.lower() if case else w not in out)]
        return _verdict(k, not missing, f"missing {missing[0]!r}" if missing else "")
    if k == "regex":
        return _verdict(k, re.search(v, out, case) is not None)
    if k == "json_schema":
        try:
            value = parse_json(out)
        except ValueError:
            return {"kind": k, "passed": False, "detail": "output is not JSON", "unparsable": True}
        errors = sorted(_validator(v)(v).iter_errors(value), key=str)
        return _verdict(k, not errors, errors[0].message[:200] if errors else "")
    if k == "python":
        passed, detail = python_verdicts.get(python_key(check, out, row), (False, "not run"))
        return {"kind": k, "passed": passed, "detail": detail, **({"unparsable": True} if detail else {})}
    measured = answer.get("completion_tokens") if k == "max_tokens" else answer.get("latency_ms")
    if measured is None:
        return {"kind": k, "passed": None, "detail": f"{k.split('_')[0]} not reported"}
    return _verdict(k, measured <= v, f"{measured:g} > {v:g}" if measured > v else "")


def _verdict(kind: str, passed: bool, detail: str = "") -> dict:
    return {"kind": kind, "passed": bool(passed), "detail": detail}


def run_python(jobs: dict) -> dict:
    """Run python checks {key: (program, timeout)} in the sandbox; {key: (passed, why not parsed)}."""
    from ..sandbox import Limits, run_many

    out = {}
    by_timeout: dict = {}
    for key, (program, timeout) in jobs.items():
        by_timeout.setdefault(float(timeout), []).append((key, program))
    for timeout, batch in by_timeout.items():
        results = run_many([p for _, p in batch], Limits(timeout=timeout))
        for (key, _), r in zip(batch, results):
            verdict = re.search(r"__verdict__(true|false)", r.stdout or "")
            out[key] = (verdict.group(1) == "true", "") if verdict else \
                (False, f"check raised or ran out of time ({r.status}: {(r.reason or '')[:160]})")
    return out


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def token_f1(pred: str, ref: str) -> float:
    """SQuAD's token F1 between the output and the reference (lowercased, punctuation removed)."""
    p, r = normalise(pred).split(), normalise(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def failure_reason(answer: dict, checks: list[dict]) -> str | None:
    """Why an answer counts as a failure (error, timeout, empty, refusal, unparsable), or None."""
    if answer.get("error"):
        return "timeout" if "timeout" in answer["error"].lower() or "timed out" in answer["error"].lower() \
            else "error"
    out = answer.get("output") or ""
    if not out.strip():
        return "empty"
    if REFUSAL.search(out):
        return "refusal"
    if any(c.get("unparsable") for c in checks):
        return "unparsable"
    return None
