"""API keys: bearer tokens compared in constant time, each with optional per-minute limits.

`--api-key KEY` serves one key without limits. `--api-keys FILE` reads one key per line, optionally followed by
limits, a name and `admin`: `sk-team-a rpm=60 tpm=20000 name=team-a` (blank lines and `#` comments are skipped).
The name is the key's tenant: its files, jobs and fine-tuned models are its own (keys that share a name share
them); an `admin` key sees every tenant's and may load and unload models. `--api-key` alone is an admin key. rpm
counts requests and tpm tokens (prompt + completion) over the last 60 seconds; past either, requests get 429 with
a Retry-After saying when the oldest of them leaves the window. `policy=redact-pii,block-toxic` adds output policy
actions (policy.py) to that key's responses.
"""
from __future__ import annotations

import hmac
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FmkitError
from .policy import parse_policy


@dataclass
class Key:
    secret: str
    name: str
    admin: bool = False    # sees every tenant's files and jobs, and may load and unload models
    rpm: int = 0           # 0: no limit
    tpm: int = 0
    policy: frozenset = frozenset()   # output policy actions for this key's responses, on top of the server's
    requests: deque = field(default_factory=deque)   # request times in the last minute
    tokens: deque = field(default_factory=deque)     # (time, tokens) in the last minute


def read_keys(api_key: str | None, api_keys: str | None) -> list[Key]:
    keys = [Key(api_key, "default", admin=True)] if api_key else []   # one key: its holder runs the server
    if api_keys:
        path = Path(api_keys).expanduser()
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            raise FmkitError(f"cannot read the API key file {path}: {e.strerror}") from None
        for n, line in enumerate(lines, 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            key = Key(words[0], f"key-{n}")
            for word in words[1:]:
                if word == "admin":
                    key.admin = True
                    continue
                field_, sep, value = word.partition("=")
                if not sep or field_ not in ("rpm", "tpm", "name", "policy"):
                    raise FmkitError(f"{path}:{n}: '{word}' is not rpm=N, tpm=N, name=NAME, policy=ACTIONS or admin")
                if field_ == "name":
                    key.name = value
                elif field_ == "policy":
                    try:
                        key.policy = parse_policy(value)
                    except ValueError as e:
                        raise FmkitError(f"{path}:{n}: {e}") from None
                elif not value.isdigit():
                    raise FmkitError(f"{path}:{n}: {field_} must be a whole number, got '{value}'")
                else:
                    setattr(key, field_, int(value))
            keys.append(key)
        if not keys:
            raise FmkitError(f"{path} holds no API keys")
    return keys


class Keys:
    def __init__(self, keys: list[Key]):
        self.keys = keys
        self.lock = threading.Lock()

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def find(self, header: str | None) -> Key | None:
        """The key a `Authorization: Bearer ...` header carries, or None. Every key is compared (in constant
        time), so how long this takes says nothing about which key came close."""
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.secret.encode(), token.strip().encode()):
                found = key
        return found

    def admit(self, key: Key) -> float:
        """0 if the key may make a request now (and count it), else seconds until it may."""
        now = time.monotonic()
        with self.lock:
            while key.requests and now - key.requests[0] >= 60:
                key.requests.popleft()
            while key.tokens and now - key.tokens[0][0] >= 60:
                key.tokens.popleft()
            if key.rpm and len(key.requests) >= key.rpm:
                return 60 - (now - key.requests[0])
            if key.tpm and sum(n for _, n in key.tokens) >= key.tpm:
                return 60 - (now - key.tokens[0][0])
            key.requests.append(now)
            return 0.0

    def spend(self, key: Key, tokens: int) -> None:
        with self.lock:
            key.tokens.append((time.monotonic(), tokens))
