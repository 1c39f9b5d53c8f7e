"""PII and secret redaction: each match is replaced by a typed placeholder and counted by type.

Patterns are checked beyond the regex where a cheap check exists: credit-card numbers must pass Luhn and carry a
card network's prefix, IP addresses must parse (and a dotted version number such as `version 1.2.3.4` is left
alone), phone numbers need separators so plain integers in code are not touched.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from .filters import Block

PLACEHOLDERS = {
    "email": "<EMAIL>", "ip_address": "<IP_ADDRESS>", "phone": "<PHONE>", "credit_card": "<CREDIT_CARD>",
    "aws_key": "<AWS_KEY>", "private_key": "<PRIVATE_KEY>", "api_token": "<API_TOKEN>", "secret": "<SECRET>",
}

_PRIVATE_KEY = re.compile(r"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY((?: BLOCK)?)-----.*?-----END \1PRIVATE KEY\2-----",
                          re.S)
_AWS_KEY = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}(?![A-Z0-9])")
_AWS_SECRET = re.compile(r"(?i)(aws_?secret_?(?:access_?)?key\s*[=:]\s*[\"']?)([A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])")
_TOKENS = re.compile(
    r"(?<![\w-])(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{60,255}|xox[abprs]-[A-Za-z0-9-]{10,}"
    r"|sk-(?:proj-|ant-)?[A-Za-z0-9_-]{32,}|AIza[0-9A-Za-z_-]{35}|glpat-[A-Za-z0-9_-]{20}"
    r"|eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,})(?![\w-])")
# key = "value" assignments whose name says secret and whose value looks random (long, mixed letters and digits).
_ASSIGNED = re.compile(r"(?i)((?:api[_-]?key|secret[_-]?key|access[_-]?token|auth[_-]?token|client[_-]?secret|"
                       r"password|passwd)[\"']?\s*[=:]\s*[\"'])([^\"'\s]{16,})([\"'])")
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}(?![\w-])")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}:){2,7}(?::|(?::[0-9A-Fa-f]{1,4}){1,6}|[0-9A-Fa-f]{1,4})"
                   r"(?![\w:])")
_PHONE = re.compile(r"(?<![\w+.-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w-]|\.\d)"
                    r"|(?<![\w+])\+\d{1,3}(?:[ .-]\d{1,4}){3,5}(?![\w-]|\.\d)")
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_VERSION_CONTEXT = re.compile(r"(?i)(?:version|release|v|python|rev|build)\s*$")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_network(digits: str) -> bool:
    """Visa, Mastercard, Amex, Discover, Diners, JCB, UnionPay prefixes with their lengths."""
    n = len(digits)
    if digits[0] == "4":
        return n in (13, 16, 19)
    if digits[:2] in ("34", "37"):
        return n == 15
    p2, p4 = int(digits[:2]), int(digits[:4])
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        return n == 16
    if digits.startswith(("6011", "65")) or 644 <= int(digits[:3]) <= 649:
        return n in (16, 19)
    if digits[:2] in ("36", "38") or 300 <= int(digits[:3]) <= 305:
        return n in (14, 16)
    if 3528 <= p4 <= 3589:
        return n in (16, 19)
    if digits[:2] == "62":
        return 16 <= n <= 19
    return False


@dataclass
class PIIRedact(Block):
    applies_to: str = "all"
    types: list = field(default_factory=lambda: list(PLACEHOLDERS))
    name = "pii"

    def __call__(self, doc) -> str | None:
        text, counts = doc.text, doc.counts
        want = set(self.types)

        def sub(kind, pattern, text, check=None, group=None):
            def repl(m):
                if check and not check(m, text):
                    return m.group(0)
                counts[f"pii_{kind}"] += 1
                if group is None:
                    return PLACEHOLDERS[kind]
                return m.group(1) + PLACEHOLDERS[kind] + (m.group(3) if m.lastindex >= 3 else "")
            return pattern.sub(repl, text) if kind in want else text

        # Secrets first: a key block or token may contain things that look like other PII.
        text = sub("private_key", _PRIVATE_KEY, text)
        text = sub("aws_key", _AWS_KEY, text)
        text = sub("aws_key", _AWS_SECRET, text, group=2)
        text = sub("api_token", _TOKENS, text)
        text = sub("secret", _ASSIGNED, text, check=lambda m, t: _looks_random(m.group(2)), group=2)
        text = sub("email", _EMAIL, text)
        text = sub("credit_card", _CARD, text, check=_is_card)
        text = sub("ip_address", _IPV4, text, check=_is_ipv4)
        text = sub("ip_address", _IPV6, text, check=_is_ipv6)
        text = sub("phone", _PHONE, text)
        doc.text = text
        return None


def _looks_random(value: str) -> bool:
    return any(c.isdigit() for c in value) and any(c.isalpha() for c in value) and not value.startswith(("<", "{", "$"))


def _is_card(m: re.Match, text: str) -> bool:
    digits = re.sub(r"[ -]", "", m.group(0))
    return 13 <= len(digits) <= 19 and _card_network(digits) and luhn_ok(digits)


def _is_ipv4(m: re.Match, text: str) -> bool:
    if _VERSION_CONTEXT.search(text[max(0, m.start() - 12):m.start()]):
        return False
    try:
        ip = ipaddress.IPv4Address(m.group(0))
    except ValueError:
        return False
    return not ip.is_unspecified


def _is_ipv6(m: re.Match, text: str) -> bool:
    s = m.group(0)
    if sum(1 for g in s.split(":") if g) < 3:  # `a[1::2]`, `12:30:45` and friends are not addresses
        return False
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True
