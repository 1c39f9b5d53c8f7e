"""What the ratings page and `fmkit arena ratings` show: the human votes' Bradley–Terry ratings (ratings.py), vote
counts by voter, the rejected votes by reason, and for each judge that has judged the votes its agreement with
the voters and the ratings its verdicts alone would give.

Agreement: a human "tie" and "both bad" both count as a tie (neither answer preferred), which is what a judge's
[[C]], or two verdicts that change with the order, amount to. Reported over all judged votes and over the votes
where the voter preferred one answer, with the confusion table and Cohen's kappa (agreement beyond chance).
"""
from __future__ import annotations

import json
import math

from .arena_store import ArenaStore
from .ratings import ratings

OUTCOMES = ("a", "b", "tie")


def outcome(winner: str) -> str:
    """A vote's winner as a judge could give it: a, b or tie."""
    return winner if winner in ("a", "b") else "tie"


def agreement(votes: list[dict], judged: dict[int, str]) -> dict:
    """How often the judge's winner (by vote id) matches the voter's, over the votes it has judged."""
    pairs = [(outcome(v["winner"]), judged[v["id"]]) for v in votes if v["id"] in judged]
    table = {h: {j: 0 for j in OUTCOMES} for h in OUTCOMES}
    for h, j in pairs:
        table[h][j] += 1
    n = len(pairs)
    decisive = [(h, j) for h, j in pairs if h != "tie"]
    agree = sum(h == j for h, j in pairs) / n if n else None
    chance = sum(sum(table[k].values()) * sum(table[h][k] for h in OUTCOMES) for k in OUTCOMES) / n ** 2 if n \
        else None
    kappa = (agree - chance) / (1 - chance) if n and chance < 1 else None
    return {"judged": n, "agreement": agree,
            "decisive": len(decisive), "decisive_agreement":
                sum(h == j for h, j in decisive) / len(decisive) if decisive else None,
            "kappa": kappa, "table": table}


def order_effects(judgements) -> dict:
    """Of the judge's verdict pairs [A first, B first]: how many it could not read, and how many changed with the
    order (e.g. "the first answer" both times: the judge's own position bias)."""
    unparsable = flipped = 0
    for j in judgements:
        first, second = json.loads(j["verdicts"])
        if first is None or second is None:
            unparsable += 1
        elif (first, second) not in (("A", "B"), ("B", "A"), ("C", "C")):
            flipped += 1
    return {"unparsable": unparsable, "order_dependent": flipped}


def _finite(x):
    """NaN and infinities as None, so that the result is valid JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def standings(store: ArenaStore, length_control: bool = False, bootstrap: int = 200, seed: int = 0,
              memo: dict | None = None) -> dict:
    """Ratings, counts, rejections and judge agreement; `memo` keeps the ratings until the votes or verdicts
    change (a bootstrap refits the model hundreds of times)."""
    votes = store.votes()
    full = {judge: store.judgements(judge) for judge in store.judges()}
    judged = {judge: {i: j["winner"] for i, j in given.items()} for judge, given in full.items()}
    key = (len(votes), votes[-1]["id"] if votes else 0, tuple((j, len(d)) for j, d in judged.items()),
           length_control, bootstrap, seed)
    if memo is not None and key in memo:
        rated, judges = memo[key]
    else:
        rated = ratings(votes, length_control, bootstrap, seed)
        judges = {}
        for judge, verdicts in judged.items():
            as_votes = [{**v, "winner": verdicts[v["id"]]} for v in votes if v["id"] in verdicts]
            judges[judge] = {**agreement(votes, verdicts), **order_effects(full[judge].values()),
                             "ratings": ratings(as_votes, length_control, bootstrap, seed)["ratings"]}
        if memo is not None:
            memo.clear()
            memo[key] = rated, judges
    voters: dict[str, int] = {}
    for v in votes:
        voters[v["voter"]] = voters.get(v["voter"], 0) + 1
    return _finite({**rated, "length_control": length_control, "bootstrap": bootstrap,
                    "outcomes": {w: sum(v["winner"] == w for v in votes) for w in ("a", "b", "tie", "both_bad")},
                    "voters": dict(sorted(voters.items(), key=lambda kv: -kv[1])),
                    "rejected": store.rejections(), "judges": judges})
