"""What the fmkit serve tests send: a chat request through the openai SDK, a raw POST, and the pool's model."""
from __future__ import annotations

import json
import urllib.error
import urllib.request


def chat(client, text="hello", **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=kw.pop("model", "tiny"),
                                          messages=[{"role": "user", "content": text}], **kw)


def loaded(bg, name):
    """The pool's loaded model `name` (loaded now if it is not)."""
    served = bg.app.state.pool.get(name)
    bg.app.state.pool.done(served)
    return served


def post(url, body: bytes | dict, headers=None):
    """A raw POST: (status, parsed body, headers)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)
