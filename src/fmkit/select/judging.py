"""A judge model over suite rows with a rubric: a 1-10 rating per answer, and preferences between two candidates'
answers judged in both orders (an answer wins only when preferred both times, which cancels position bias).

Replies are kept in the run's store, so a resumed compare asks the judge nothing twice.
"""
from __future__ import annotations

from ..evals.judge import parse_rating, parse_verdict
from ..providers import GenRequest, Model
from .answers import Store

RATE = """You are an impartial judge. Grade the answer to the user's input against the rubric. Explain briefly, \
then give a rating from 1 to 10 strictly in the form [[rating]], for example: Rating: [[6]].

[Rubric]
{rubric}

[Input]
{question}

[Answer]
{answer}
"""

PREFER = """You are an impartial judge. Compare two answers to the user's input against the rubric and decide \
which is better. Do not let the order of the answers or their length sway you. Explain briefly, then give your \
verdict strictly as [[A]] if answer A is better, [[B]] if answer B is better, or [[C]] for a tie.

[Rubric]
{rubric}

[Input]
{question}

[Answer A]
{a}

[Answer B]
{b}
"""


def _text(x) -> str:
    return x if isinstance(x, str) else "\n".join(f"{m['role']}: {m['content']}" for m in x)


def _ask(judge: Model, store: Store, prompts: list[str], max_tokens: int) -> list[str]:
    keys = [Store.key("judge", judge.name, p) for p in prompts]
    todo = list({k: i for i, k in enumerate(keys) if store.get(k) is None}.values())   # each prompt once
    if todo:
        replies = judge.chat([GenRequest(prompts[i], [], max_tokens, 0.0) for i in todo])
        for i, r in zip(todo, replies):
            store.put(keys[i], r)
    return [store.get(k) for k in keys]


def rate(judge: Model, store: Store, jobs: list[tuple], max_tokens: int = 512) -> list[float | None]:
    """jobs: (rubric, input, answer); a rating 1-10 each, None where the judge gave none."""
    prompts = [RATE.format(rubric=r, question=_text(q), answer=a or "") for r, q, a in jobs]
    return [parse_rating(reply) for reply in _ask(judge, store, prompts, max_tokens)]


def prefer(judge: Model, store: Store, jobs: list[tuple], max_tokens: int = 512) -> list[str]:
    """jobs: (rubric, input, answer of A, answer of B); 'a', 'b' or 'tie' each, judged with A first and B first."""
    prompts = []
    for r, q, a, b in jobs:
        prompts += [PREFER.format(rubric=r, question=_text(q), a=a or "", b=b or ""),
                    PREFER.format(rubric=r, question=_text(q), a=b or "", b=a or "")]
    replies = _ask(judge, store, prompts, max_tokens)
    out = []
    for i in range(len(jobs)):
        first, second = parse_verdict(replies[2 * i]), parse_verdict(replies[2 * i + 1])
        out.append("a" if (first, second) == ("A", "B") else "b" if (first, second) == ("B", "A") else "tie")
    return out
