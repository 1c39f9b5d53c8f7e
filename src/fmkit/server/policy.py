"""Output policy: what the server does to the text a model generates before a client sees it.

Actions: `redact-pii` replaces emails, phone numbers, card numbers, keys and the other types data/pii.py knows by
their placeholders (`<EMAIL>`, ...); `flag-toxic` says in the response when the text is toxic; `block-toxic` also
stops the sequence there, keeping only what was already sent (streams) or nothing (whole responses), with
finish_reason `content_filter`. Toxic means a word or phrase of data/toxicity.py's list, or harassment or hate by
the moderation lexicon (moderation.py): word lists, so a floor, not a judgement of meaning.

A request gets the union of the server's policy (`--output-policy`), its model's (`--model-policy NAME=...`) and
its API key's (`policy=...` in the key file). Streams hold back the tail a later token could still change: the
last, unfinished word, and with `redact-pii` also the last HOLD characters (longer than any match that spans
spaces, such as a card number with separators), so a number split over chunks is redacted whole. The words
before one that trips the toxicity check may have been sent already; that word and what follows are not.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ..data.toxicity import Toxicity
from ..errors import FmkitError
from .moderation import Moderator, redact

ACTIONS = ("redact-pii", "flag-toxic", "block-toxic")
TOXIC_CATEGORIES = {"harassment", "harassment/threatening", "hate", "hate/threatening"}
HOLD = 40          # a card number with separators is at most 37 characters, an international phone number 29
OVERLAP = 80       # characters checked again for toxicity, so a phrase across two checks is still seen


def parse_policy(text: str) -> frozenset[str]:
    """`redact-pii,block-toxic` as a set of actions; ValueError naming an unknown one."""
    actions = frozenset(a.strip() for a in text.split(",") if a.strip())
    unknown = sorted(actions - set(ACTIONS))
    if unknown:
        raise ValueError(f"'{unknown[0]}' is not an output policy action ({', '.join(ACTIONS)})")
    return actions


class Toxic:
    """Whether a text is toxic: a hit on the toxicity word list, or harassment or hate by the lexicon."""

    def __init__(self, moderator: Moderator):
        self.words, self.moderator = Toxicity(), moderator

    def __call__(self, text: str) -> bool:
        return self.words.score(text)[1] > 0 or bool(self.moderator.flags(text) & TOXIC_CATEGORIES)


def _boundary(text: str, limit: int) -> int:
    """The last place at or before `limit` where a word starts (0 if none): text is only ever cut there."""
    if limit <= 0:
        return 0
    return max(text.rfind(c, 0, limit) for c in " \n\t\r\f\v") + 1   # rfind: a long unbroken run costs little


class Screen:
    """One choice's text under a policy: checked, redacted and perhaps blocked, whole or as it streams."""

    def __init__(self, actions: frozenset, toxic: Callable[[str], bool]):
        self.actions, self.toxic = actions, toxic
        self.redacts = "redact-pii" in actions
        self.checks = bool(actions & {"flag-toxic", "block-toxic"})
        self.redacted: Counter = Counter()
        self.flagged = self.blocked = False
        self.checked = 0                 # characters of the text checked for toxicity
        self.start, self.shown = 0, ""   # streams: characters of the text let through, and what was sent for them

    def blocks(self, text: str, final: bool) -> bool:
        """Check what has not been checked (whole words only, until `final`); True once the text is blocked."""
        if self.checks and not self.flagged:
            end = len(text) if final else _boundary(text, len(text))
            if end > self.checked:
                self.flagged = self.toxic(text[_boundary(text, self.checked - OVERLAP):end])
                self.checked = end
        self.blocked = self.flagged and "block-toxic" in self.actions
        return self.blocked

    def stream(self, text: str, final: bool) -> str:
        """All that may be sent of `text` so far (it only grows): redacted, short of the tail that is not yet
        safe. Call `blocks` first."""
        if self.blocked:
            return self.shown
        rest = text[self.start:]
        if final or not (self.redacts or "block-toxic" in self.actions):
            cut = len(rest)
        elif not self.redacts:
            cut = _boundary(rest, len(rest))
        else:
            cut = _boundary(rest, len(rest) - HOLD)
            begin = rest.rfind("-----BEGIN")     # a key block is redacted whole, however long, once it has ended
            end = rest.find("-----END", begin)
            if begin >= 0 and (end < 0 or rest.find("-----", end + 8) < 0):
                cut = min(cut, begin)
            # a cut that splits a match the whole text has moves back a word, until it splits none
            while cut > 0 and redact(rest[:cut]) + redact(rest[cut:]) != redact(rest):
                cut = _boundary(rest, cut - 1)
        piece = rest[:cut]
        self.shown += redact(piece, self.redacted) if self.redacts else piece
        self.start += cut
        return self.shown

    def whole(self, text: str) -> str:
        """A whole response's text under the policy ("" when blocked)."""
        if self.blocks(text, True):
            return ""
        return redact(text, self.redacted) if self.redacts else text

    def reason(self, finish_reason: str | None) -> str | None:
        return "content_filter" if self.blocked else finish_reason

    def results(self) -> dict:
        """The choice's `content_filter_results` (Azure OpenAI's field): what was redacted, flagged, filtered."""
        out = {}
        if self.redacts:
            out["pii"] = {"redacted": sum(self.redacted.values()), "types": dict(self.redacted)}
        if self.checks:
            out["toxicity"] = {"flagged": self.flagged, "filtered": self.blocked}
        return out


@dataclass(frozen=True)
class Policy:
    """The actions one request's output gets, and what they check with."""
    actions: frozenset
    toxic: Callable[[str], bool]

    @property
    def changes_text(self) -> bool:
        return bool(self.actions & {"redact-pii", "block-toxic"})

    def screen(self) -> Screen:
        return Screen(self.actions, self.toxic)


class Policies:
    """The output policy of the server, of each model and of each key; a request gets their union."""

    def __init__(self, server: frozenset = frozenset(), models: dict | None = None,
                 moderator: Moderator | None = None):
        self.server, self.models = server, models or {}
        self.toxic = Toxic(moderator or Moderator())

    def of(self, model: str, key=None) -> Policy | None:
        actions = self.server | self.models.get(model, frozenset()) | getattr(key, "policy", frozenset())
        return Policy(actions, self.toxic) if actions else None


def policies_of(output_policy: str, model_policy: dict | None, moderator: Moderator,
                served: set[str] | None = None) -> Policies:
    """The policies `--output-policy` and `--model-policy NAME=ACTIONS` (repeatable) give; `served`, where the
    names are known up front, catches a NAME that is no served model (fine-tuned ft: models appear later)."""
    try:
        server = parse_policy(output_policy)
    except ValueError as e:
        raise FmkitError(f"--output-policy: {e}") from None
    models = {}
    for name, value in (model_policy or {}).items():
        if served is not None and name not in served and not name.startswith("ft:"):
            raise FmkitError(f"--model-policy {name}=...: no model is served as '{name}' (served: "
                             f"{', '.join(sorted(served))})")
        try:
            models[name] = frozenset().union(*map(parse_policy, value if isinstance(value, list) else [value]))
        except ValueError as e:
            raise FmkitError(f"--model-policy {name}: {e}") from None
    return Policies(server, models, moderator)


def count(metrics, model: str, screens) -> None:
    """A finished response's redactions (by type), and whether it was flagged or blocked, into the metrics."""
    screens = list(screens)
    for screen in screens:
        for kind, n in screen.redacted.items():
            metrics.inc("fmkit_pii_redactions_total", n, model=model, type=kind)
    if any(s.flagged for s in screens):
        metrics.inc("fmkit_flagged_responses_total", model=model)
    if any(s.blocked for s in screens):
        metrics.inc("fmkit_blocked_responses_total", model=model)
