"""The next token of one sequence from its logits: OpenAI's logit_bias and presence/frequency penalties, then
greedy (temperature 0) or sampling with top-k / top-p, then, for JSON output, the first candidate the grammar
allows.

Sampling is Gumbel-max (argmax of logits / T plus Gumbel noise from the sequence's own generator), which draws
exactly from softmax(logits / T) and ranks every token at once: under a grammar the first allowed token of that
ranking is a draw from the distribution restricted to the allowed tokens, so constrained and free sampling are
the same code.
"""
from __future__ import annotations

import torch


def adjusted(seq, logits: torch.Tensor) -> torch.Tensor:
    """Logits after logit_bias and the presence/frequency penalties over the tokens generated so far."""
    p = seq.params
    x = logits.float().clone()
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
        x[ids] += torch.tensor(list(p.logit_bias.values()), dtype=x.dtype)
    if (p.presence_penalty or p.frequency_penalty) and seq.tokens:
        counts = torch.bincount(torch.tensor(seq.tokens), minlength=len(x))[:len(x)].to(x.dtype)
        x -= counts * p.frequency_penalty + (counts > 0).to(x.dtype) * p.presence_penalty
    return x


def ranked_scores(seq, x: torch.Tensor) -> torch.Tensor:
    """Scores whose argmax is the next token: the logits (greedy), or a Gumbel-max draw under top-k / top-p."""
    p = seq.params
    if p.temperature <= 0:
        return x
    x = x / p.temperature
    if p.top_k and p.top_k < len(x):
        x = x.masked_fill(x < torch.topk(x, p.top_k).values[-1], float("-inf"))
    if p.top_p < 1.0:
        probs, order = x.softmax(-1).sort(descending=True)
        drop = probs.cumsum(-1) - probs >= p.top_p  # keep the smallest prefix whose mass reaches top_p
        x = x.clone()
        x[order[drop]] = float("-inf")
    u = torch.rand(len(x), generator=seq.gen).clamp_(min=1e-20)
    return x - torch.log(-torch.log(u))


def choose(seq, logits: torch.Tensor, encode, room: int) -> tuple[int, list[int]]:
    """(next token, tokens forced after it). Forced tokens finish a JSON document when the tokens left (`room`)
    are about to run out, or when no likely token fits the grammar."""
    guide = seq.params.guide
    if guide is not None:
        forced = guide.forced(seq.text, room, encode)
        if forced:
            return forced[0], forced[1:]
    scores = ranked_scores(seq, adjusted(seq, logits))
    if guide is None:
        return int(scores.argmax()), []
    order = scores.argsort(descending=True)
    token = guide.pick(seq.text, (t for part in order.split(512) for t in part.tolist()))
    if token is not None:
        return token, []
    rest = encode(guide.constraint.finish(seq.text)) or [guide.eos_id]
    return rest[0], rest[1:]


def top_logprobs(lp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens and their log-probabilities, most likely first."""
    if not k:
        return []
    values, ids = torch.topk(lp, min(k, len(lp)))
    return list(zip(ids.tolist(), values.tolist()))
