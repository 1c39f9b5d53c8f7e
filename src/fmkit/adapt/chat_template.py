"""The chat template fmkit saves into its tokenizers, and tokenisation with an assistant-only loss mask.

The template is plain text with role headers, rendered by transformers' `apply_chat_template` like any other.
`encode_chat` renders messages piece by piece so the mask is exact: tokens of assistant replies (and the EOS that
ends each) are trained on; system and user turns and the role headers are not.
"""
from __future__ import annotations

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def ensure_chat_template(tok) -> bool:
    """Give a tokenizer fmkit's chat template when it has none; returns True when it was added."""
    if getattr(tok, "chat_template", None):
        return False
    tok.chat_template = CHAT_TEMPLATE
    return True


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
