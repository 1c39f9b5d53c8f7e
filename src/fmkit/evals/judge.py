"""Model as judge: single-answer grading (a 1-10 rating) and pairwise comparison judged in both orders.

Single: the judge is asked for a rating written as [[x]]; a reply without one is dropped from the score and
counted as unparsable. Pairwise (MT-Bench style): the two answers are shown in both orders; an answer wins only if
the judge prefers it both times, anything else is a tie, which cancels the judge's position bias.
"""
from __future__ import annotations

import re

from ..providers.base import GenRequest, Model

SINGLE = """You are an impartial judge. Rate the quality of the assistant's answer to the user's question for \
helpfulness, correctness, depth and clarity. Explain briefly, then give the rating from 1 to 10 strictly in the \
form [[rating]], for example: Rating: [[6]].

[Question]
{question}

[Answer]
{answer}
"""

PAIRWISE = """You are an impartial judge. Compare two assistants' answers to the user's question and decide which \
is better for helpfulness, correctness, depth and clarity. Do not let the order of the answers, their length or \
the assistants' names sway you. Explain briefly, then give your verdict strictly as [[A]] if assistant A is \
better, [[B]] if assistant B is better, or [[C]] for a tie.

[Question]
{question}

[Answer of assistant A]
{a}

[Answer of assistant B]
{b}
"""

_RATING = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")
_VERDICT = re.compile(r"\[\[([ABC])\]\]")


def parse_rating(text: str) -> float | None:
    m = _RATING.search(text)
    if not m:
        return None
    value = float(m.group(1))
    return value if 1 <= value <= 10 else None


def parse_verdict(text: str) -> str | None:
    m = _VERDICT.search(text)
    return m.group(1) if m else None


def grade_single(judge: Model, questions: list[str], answers: list[str], max_tokens: int = 512) -> list[dict]:
    replies = judge.chat([GenRequest(SINGLE.format(question=q, answer=a), [], max_tokens, 0.0)
                          for q, a in zip(questions, answers)])
    return [{"judgement": r, "rating": parse_rating(r)} for r in replies]


def grade_pairwise(judge: Model, questions: list[str], answers: list[str], baselines: list[str],
                   max_tokens: int = 512) -> list[dict]:
    """Per item: 'win' (the model's answer preferred in both orders), 'loss' (the baseline in both), or 'tie'."""
    reqs = []
    for q, a, b in zip(questions, answers, baselines):
        reqs.append(GenRequest(PAIRWISE.format(question=q, a=a, b=b), [], max_tokens, 0.0))   # model first
        reqs.append(GenRequest(PAIRWISE.format(question=q, a=b, b=a), [], max_tokens, 0.0))   # baseline first
    replies = judge.chat(reqs)
    out = []
    for i in range(len(questions)):
        first, second = parse_verdict(replies[2 * i]), parse_verdict(replies[2 * i + 1])
        if first == "A" and second == "B":
            outcome = "win"
        elif first == "B" and second == "A":
            outcome = "loss"
        else:
            outcome = "tie"
        out.append({"judgements": [replies[2 * i], replies[2 * i + 1]], "verdicts": [first, second],
                    "outcome": outcome, "unparsable": first is None or second is None})
    return out
