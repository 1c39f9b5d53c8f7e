"""Chat templates and tokenisation with an assistant-only loss mask.

fmkit's own template is plain text with role headers, rendered by transformers' `apply_chat_template` like any
other. `encode_chat` renders messages under it piece by piece so the mask is exact: tokens of assistant replies
(and the EOS that ends each) are trained on; system and user turns and the role headers are not. A model that
brings its own template is trained in that format (`encode_templated`), so it is prompted later as it was tuned.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import FmkitError
from ..models.reference import ModelRef

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def use_template(tok, model: ModelRef, template: str = "chat", plain_ok: bool = True) -> str:
    """Give `tok` the chat template conversations are rendered in; returns which one, for fmkit.json.

    template: "chat" — the tokenizer's own chat template; a model fmkit built (fmkit.json) that has none gets
    fmkit's; any other model without one is refused, since inventing a format for it would not match how it was
    trained. "fmkit" — fmkit's role headers, replacing the tokenizer's. A path to a .jinja file — that template.
    `plain_ok`: whether the caller also takes "none" (training does; a conversation needs roles), for the error."""
    if template == "fmkit":
        tok.chat_template = CHAT_TEMPLATE
        return "fmkit"
    if template != "chat":
        path = Path(template)
        if not path.is_file():
            raise FmkitError(f"template must be chat, fmkit, none or a .jinja file; {template} is none of these")
        tok.chat_template = path.read_text()
        return f"file {path.resolve()}"
    if not getattr(tok, "chat_template", None):
        if not model.built_by_fmkit:
            plain = ", or --template none (texts back to back)" if plain_ok else ""
            raise FmkitError(f"{model.spec} has no chat template: pass --template fmkit (fmkit's role headers) or "
                             f"--template FILE.jinja (your own){plain}")
        tok.chat_template = CHAT_TEMPLATE
        return "fmkit (added)"
    return "fmkit" if tok.chat_template == CHAT_TEMPLATE else "the model's own"


def choose_encoding(tok, base: ModelRef, template: str = "chat") -> tuple[Callable, str]:
    """How conversations become (ids, loss mask) for this model; also returns what was used, for fmkit.json.
    `template` as in `use_template`, or "none": the turns' texts back to back (base-model style). A model that
    gets fmkit's template keeps it, saved with the result."""
    if template == "none":
        return encode_plain, "none"
    used = use_template(tok, base, template)
    return (encode_chat if used.startswith("fmkit") else encode_templated), used


def encode_templated(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) under the tokenizer's own chat template. Each trained assistant turn's characters
    are found by rendering the conversation up to it (with the generation prompt) and through it; tokens that
    start inside such a span are trained, which includes the template's end-of-turn marker."""
    conv = [{"role": m["role"], "content": m["content"]} for m in messages]

    def render(msgs, prompt=False):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt) if msgs else ""

    text, spans = render(conv), []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) != 1:
            continue
        before, through = render(conv[:i], True), render(conv[:i + 1])
        if not (text.startswith(before) and text.startswith(through)):
            raise FmkitError("this chat template renders a conversation's start differently from the whole, so the "
                             "assistant turns cannot be located: pass --template fmkit or a .jinja file")
        spans.append((len(before), len(through)))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [1 if any(s <= a < e for s, e in spans) else 0 for a, _ in enc["offset_mapping"]]
    return enc["input_ids"], mask


def encode_plain(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """No template: the turns' texts back to back (a prompt/completion pair as the model would see raw text),
    with the loss on the assistant text only. For base models evaluated on raw prompts."""
    ids, mask = [], []
    for m in messages:
        t = tok(m["content"], add_special_tokens=False)["input_ids"]
        ids += t
        mask += [1 if m["role"] == "assistant" and m.get("weight", 1) == 1 else 0] * len(t)
    return ids, mask


def encode_chat(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(token ids, loss mask 1/0) for one conversation under fmkit's template."""
    ids, mask = [], []
    eos = tok.eos_token or ""
    for m in messages:
        header = f"<|{m['role']}|>\n"
        trained = m["role"] == "assistant" and m.get("weight", 1) == 1
        for text, learn in ((header, False), (m["content"] + (eos if m["role"] == "assistant" else ""), trained),
                            ("\n", False)):
            t = tok(text, add_special_tokens=False)["input_ids"]
            ids += t
            mask += [1 if learn else 0] * len(t)
    return ids, mask
