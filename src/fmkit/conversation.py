"""`fmkit chat MODEL`: talk to any model reference in its own chat template, one turn after another.

On a terminal it is a conversation: replies stream token by token, the history is kept across turns, Ctrl-C stops
the reply being written (what was shown stays in the history) and never the session; `/reset`, `/save FILE`,
`/exit`. With stdin not a terminal it is a batch job: one conversation per JSONL line in (`{"messages": [...]}`),
the same conversation with the model's reply appended out, one line each, in order; a bad line gets an
`{"line": N, "error": ...}` row in its place, so output lines match input lines.

`/save` writes OpenAI chat JSONL (`{"messages": [...]}` per line, appended): a good conversation becomes
fine-tuning data for `fmkit finetune` as it is.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Literal

from .errors import FmkitError
from .models.reference import ModelRef, resolve

HELP = "/reset starts over, /save FILE appends the conversation to FILE (chat JSONL), /exit ends (or Ctrl-D)"


class Chat:
    """A conversation with one model: the history, rendered in the model's chat template, and replies to it."""

    def __init__(self, model: str | Path | ModelRef, system: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.7, top_p: float = 0.95, seed: int = 0, dtype: str = "auto",
                 template: str = "chat", base: str | None = None, workspace: str | Path | None = None, **remote):
        self.ref = resolve(model, base, workspace)
        self.system, self.max_new_tokens = system, max_new_tokens
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.messages: list[dict] = []
        self.turns = 0
        if self.ref.local:
            from .adapt.chat_template import CHAT_TEMPLATE, use_template
            from .models.generate import Generator

            self.gen = Generator(self.ref, dtype)
            if self.max_new_tokens > self.gen.max_positions // 2:
                # a reply budget as long as the context would leave no room for the conversation itself
                from .progress import warn

                self.max_new_tokens = self.gen.max_positions // 2
                warn(f"replies capped at {self.max_new_tokens} tokens, half of {self.ref.spec}'s "
                     f"{self.gen.max_positions}-token context")
            self.template = use_template(self.gen.tok, self.ref, template, plain_ok=False)
            # fmkit's role headers: a model that skips its EOS would go on to write the next turn itself
            self.stop = ["\n<|user|>", "\n<|system|>"] if self.gen.tok.chat_template == CHAT_TEMPLATE else []
        else:
            from .providers import get_model

            self.gen, self.template, self.stop = get_model(self.ref, **remote), "the provider's", []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _prompt(self, messages: list[dict]) -> str:
        """The conversation rendered for the model's next reply, oldest turns dropped while it does not fit."""
        tok = self.gen.tok
        room = self.gen.max_positions - self.max_new_tokens
        head = [m for m in messages[:1] if m["role"] == "system"]
        rest = messages[len(head):]
        while True:
            text = tok.apply_chat_template(head + rest, tokenize=False, add_generation_prompt=True)
            if len(tok(text, add_special_tokens=False)["input_ids"]) <= room or len(rest) <= 1:
                break
            rest = rest[2:] if len(rest) > 2 else rest[-1:]   # a user turn and its reply at a time
        if len(tok(text, add_special_tokens=False)["input_ids"]) > room:
            raise FmkitError(f"the message is longer than the model's context ({self.gen.max_positions} tokens, "
                             f"{self.max_new_tokens} kept for the reply); shorten it or lower --max-new-tokens")
        return text

    def replies(self, conversations: list[list[dict]], on_text: Callable[[int, str], None] | None = None) -> list[str]:
        """The model's next reply to each conversation (a batch, for local models one left-padded batch)."""
        if not self.ref.local:
            from .providers import GenRequest

            out = self.gen.chat([GenRequest(c, max_tokens=self.max_new_tokens, temperature=self.temperature,
                                            seed=self.seed) for c in conversations])
            for row, text in enumerate(out if on_text else ()):
                on_text(row, text)
            return out
        prompts = [self._prompt(c) for c in conversations]
        done = self.gen(prompts, self.max_new_tokens, self.temperature, 0, self.top_p, self.stop,
                        self.seed + self.turns, on_text=on_text)
        return [c.text.strip() for c in done]

    def say(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add a user turn, reply to it and keep the reply. Ctrl-C (KeyboardInterrupt) during the reply keeps what
        was written so far and re-raises, so a caller can carry on with the conversation."""
        self.messages.append({"role": "user", "content": text})
        shown: list[str] = []

        def collect(row: int, piece: str) -> None:
            shown.append(piece)
            if on_text:
                on_text(piece)

        try:
            reply = self.replies([self.messages], collect)[0]
        except KeyboardInterrupt:
            self.messages.append({"role": "assistant", "content": "".join(shown).strip()})
            raise
        finally:
            self.turns += 1
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    def save(self, path: str | Path) -> Path:
        """Append the conversation to `path` as one OpenAI chat JSONL line."""
        path = Path(path).expanduser()
        if not any(m["role"] == "assistant" for m in self.messages):
            raise FmkitError("nothing to save yet: the conversation has no reply")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"messages": self.messages}, ensure_ascii=False) + "\n")
        return path


def chat(model: str, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.7,
         top_p: float = 0.95, seed: int = 0, dtype: Literal["auto", "fp32", "bf16"] = "auto",
         template: str = "chat", batch_size: int = 8, base: str | None = None, base_url: str = "",
         api_key: str = "", workspace: str | Path | None = None) -> dict:
    """Chat with a model: interactively on a terminal, or one JSONL conversation per line from stdin.

    Any model reference works, adapters and hosted models included. On a terminal replies stream as they are
    written; Ctrl-C stops the current reply, not the session; /reset, /save FILE (OpenAI chat JSONL, ready for
    fmkit finetune) and /exit. From a pipe: each input line {"messages": [...]} gets one output line with the
    model's reply appended as an assistant message.

    Args:
        model: Model reference: a model or adapter folder, a model name in the workspace, hf:ORG/NAME, openai:NAME
            or anthropic:NAME.
        system: System message that opens the conversation (and every piped one that has none).
        max_new_tokens: Longest reply, in tokens.
        temperature: Sampling temperature; 0 is greedy.
        top_p: Nucleus sampling mass (1.0: off).
        seed: Sampling seed (each turn draws from seed + turn).
        dtype: auto (bf16 where the CPU has bf16 instructions, else fp32), fp32 or bf16.
        template: chat (the model's own chat template; fmkit's for fmkit models without one), fmkit, or a .jinja
            file.
        batch_size: Piped input: conversations answered together.
        base: An adapter's base model, instead of the one the adapter names.
        base_url: OpenAI-compatible server URL for openai:NAME (e.g. http://localhost:8000/v1).
        api_key: API key for hosted models (default $OPENAI_API_KEY / $ANTHROPIC_API_KEY).
        workspace: Workspace folder where bare model names are looked up.

    Returns {turns} for a terminal session, {conversations, answered, failed: {reason: count}} for piped input.
    """
    ref = resolve(model, base, workspace)
    remote = {} if ref.local else {"base_url": base_url, "api_key": api_key}
    session = Chat(ref, system, max_new_tokens, temperature, top_p, seed, dtype, template, **remote)
    if sys.stdin.isatty():
        return _interactive(session)
    return _piped(session, sys.stdin, sys.stdout, batch_size)


def _interactive(session: Chat) -> dict:
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    out = sys.stdout
    out.write(f"chatting with {session.ref.spec} ({session.template} template); {HELP}\n")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            out.write("\n")
            break
        except KeyboardInterrupt:
            out.write("\n(Ctrl-D or /exit to leave)\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            word, _, arg = text.partition(" ")
            if word in ("/exit", "/quit"):
                break
            if word == "/reset":
                session.reset()
                out.write("(conversation cleared)\n")
            elif word == "/save" and arg.strip():
                try:
                    out.write(f"(saved to {session.save(arg.strip())})\n")
                except (FmkitError, OSError) as e:
                    out.write(f"(not saved: {e})\n")
            else:
                out.write(f"({HELP})\n")
            continue
        out.write("model> ")
        out.flush()

        def stream(piece: str) -> None:
            out.write(piece)
            out.flush()

        try:
            session.say(text, stream)
            out.write("\n")
        except KeyboardInterrupt:
            out.write(" [stopped]\n")
        except FmkitError as e:
            session.messages.pop()   # the turn that could not be answered
            out.write(f"\n(error: {e})\n")
        out.flush()
    return {"turns": session.turns}


def _piped(session: Chat, lines, out, batch_size: int) -> dict:
    from collections import Counter

    failed: Counter = Counter()
    answered = 0
    batch: list[tuple[int, list[dict]]] = []

    def flush() -> None:
        nonlocal answered
        if not batch:
            return
        for (_, conv), reply in zip(batch, session.replies([c for _, c in batch])):
            out.write(json.dumps({"messages": conv + [{"role": "assistant", "content": reply}]},
                                 ensure_ascii=False) + "\n")
            answered += 1
        out.flush()
        batch.clear()

    n = 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            conv = _conversation(line, session.system)
            if session.ref.local:
                session._prompt(conv)   # too long for the context: this line's error, not the batch's
        except FmkitError as e:
            flush()
            failed[str(e).split(" (")[0]] += 1
            out.write(json.dumps({"line": n, "error": str(e)}) + "\n")
            continue
        batch.append((n, conv))
        if len(batch) >= batch_size:
            flush()
    flush()
    if failed:
        from .progress import warn

        warn(f"{sum(failed.values())} of {n} lines not answered: " + ", ".join(f"{k} ({v})" for k, v in
                                                                             failed.items()))
    return {"conversations": answered + sum(failed.values()), "answered": answered, "failed": dict(failed)}


def _conversation(line: str, system: str | None) -> list[dict]:
    """The messages of one piped line, checked: roles and text content, ending with a user turn."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise FmkitError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    msgs = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise FmkitError("needs a non-empty 'messages' list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or \
                not isinstance(m.get("content"), str):
            raise FmkitError(f"messages[{i}] needs a role (system, user or assistant) and text content")
    if msgs[-1]["role"] != "user":
        raise FmkitError("the last message must be the user's, for the model to reply to")
    if system and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system}] + msgs
    return msgs
