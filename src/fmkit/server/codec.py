"""The engine's tokenizer calls: encode and decode straight through the Rust tokenizer where that gives
transformers' results, and the longest token, which bounds how many characters a prompt that fits can have."""
from __future__ import annotations


class Codec:
    """tok.decode and tok's encoding without special tokens, straight to the Rust tokenizer where that gives the
    same result: transformers' wrapper costs ~20 us a call in Python, the engine decodes twice per token, and
    tok(text) goes through the batch encoder, whose thread pool wakes for a single prompt."""

    def __init__(self, tok):
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None and not getattr(tok, "clean_up_tokenization_spaces", False):
            self.decode = lambda ids: backend.decode(ids, skip_special_tokens=False)
        else:
            self.decode = tok.decode
        if backend is not None and backend.truncation is None and backend.padding is None:
            self.encode = lambda text: backend.encode(text, add_special_tokens=False).ids
        else:
            self.encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]
        # the most characters one token covers, where no normalizer can drop characters before tokenizing (then
        # a text of more than context x longest characters cannot fit); 0 where that does not hold
        self.longest = 0
        if backend is not None and backend.normalizer is None:
            self.longest = max(map(len, tok.get_vocab()), default=0)
