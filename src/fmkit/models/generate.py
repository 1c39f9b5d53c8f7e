"""Generation for every model reference: temperature / top-k / top-p / stop strings; Llama-style decoders run on
the KV-cache decoder (decode.py), other architectures through transformers' generate. `fmkit generate`, `fmkit
chat`, the local provider and the server all complete text through `Generator`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FmkitError
from .build import arch_of
from .decode import LlamaDecoder
from .reference import ModelRef, resolve

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str) -> str:
    """`auto`: bf16 where this CPU multiplies bf16 natively (it halves the bytes a step reads), else fp32."""
    if dtype == "auto":
        from ..runtime import fast_bf16
        return "bf16" if fast_bf16("cpu") else "fp32"
    if dtype not in DTYPES:
        raise FmkitError(f"dtype must be auto, {' or '.join(DTYPES)}, got '{dtype}'")
    return dtype


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else softmax sampling restricted by top-k then top-p."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


class Generator:
    """A loaded model + tokenizer that completes prompts; Llama-style decoders use the fast KV-cache path."""

    def __init__(self, model: str | Path | ModelRef, dtype: str = "auto", trust_pickle: bool = False,
                 base: str | Path | None = None):
        ref = resolve(model, base)
        if not ref.local:
            raise FmkitError(f"{ref.spec} is a hosted model; generate locally from a model or adapter folder or "
                             "hf:ORG/NAME (hosted models are reached through fmkit.providers.get_model)")
        self.ref = ref
        self._setup(ref.load(trust_pickle), ref.tokenizer(), dtype)

    @classmethod
    def from_model(cls, model, tokenizer=None, dtype: str = "auto") -> "Generator":
        """Wrap an in-memory transformers model (token-level `generate_ids` works without a tokenizer)."""
        self = cls.__new__(cls)
        self._setup(model.eval(), tokenizer, dtype)
        return self

    def _setup(self, model, tokenizer, dtype: str) -> None:
        self.dtype = resolve_dtype(dtype)
        if model.config.model_type != "llama":
            self.dtype = "fp32"  # transformers' generate on the model as loaded
        if arch_of(model.config) == "encoder":
            raise FmkitError("this model is an encoder (masked LM); it fills masks but does not generate text")
        self.model, self.tok = model, tokenizer
        self.fast = LlamaDecoder(model, DTYPES[self.dtype]) if model.config.model_type == "llama" else None

    def __call__(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 0,
                 top_p: float = 1.0, stop: list[str] | tuple = (), seed: int = 0) -> list[Completion]:
        if max_new_tokens < 1:
            raise FmkitError("max_new_tokens must be at least 1")
        gen = torch.Generator().manual_seed(seed)
        if self.fast is None:
            return self._hf_generate(prompts, max_new_tokens, temperature, top_k, top_p, stop, gen)
        tok = self.tok
        eos = tok.eos_token_id
        encoded = [tok(p, add_special_tokens=False)["input_ids"] or [eos] for p in prompts]

        def hit_stop(tokens: list[int]) -> bool:
            return any(s in tok.decode(tokens) for s in stop)

        rows = self.generate_ids(encoded, max_new_tokens, temperature, top_k, top_p, eos, hit_stop if stop else None,
                                 gen)
        results = []
        for tokens, reason in rows:
            text = tok.decode(tokens)
            hit = [text.index(s) for s in stop if s in text]
            results.append(Completion(text[:min(hit)] if hit else text, tokens, reason))
        return results

    def generate_ids(self, encoded: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, eos: int | None = None, should_stop=None,
                     generator: torch.Generator | None = None) -> list[tuple[list[int], str]]:
        """Token-level generation on the fast path: new tokens and finish reason per prompt (left-padded batch)."""
        dec = self.fast
        width = max(map(len, encoded))
        if width + max_new_tokens > dec.max_positions:
            raise FmkitError(f"prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                             f"{dec.max_positions} positions; shorten the prompt or lower max_new_tokens")
        b = len(encoded)
        ids = torch.tensor([[0] * (width - len(e)) + e for e in encoded])
        real = torch.tensor([[False] * (width - len(e)) + [True] * len(e) for e in encoded])
        positions = (real.cumsum(-1) - 1).clamp(min=0)
        key_mask = None if real.all() else torch.cat([real, torch.ones(b, max_new_tokens, dtype=torch.bool)], 1)
        cache = dec.new_cache(b, width + max_new_tokens)
        logits = dec.forward(ids, positions, cache, 0, key_mask)
        pos = positions[:, -1]
        out: list[list[int]] = [[] for _ in encoded]
        done: list[str | None] = [None] * b
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            for row, t in enumerate(nxt.tolist()):
                if done[row]:
                    continue
                if t == eos:
                    done[row] = "stop"
                    continue
                out[row].append(t)
                if should_stop and should_stop(out[row]):
                    done[row] = "stop"
            if all(done) or i == max_new_tokens - 1:
                break
            pos = pos + 1
            logits = dec.forward(nxt[:, None], pos[:, None], cache, width + i, key_mask)
        return [(tokens, reason or "length") for tokens, reason in zip(out, done)]

    def _hf_generate(self, prompts, max_new_tokens, temperature, top_k, top_p, stop, gen) -> list[Completion]:
        """Other architectures (T5, any transformers decoder) go through transformers' generate."""
        torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=gen)))
        self.tok.padding_side = "left"
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, pad_token_id=self.tok.pad_token_id)
        if temperature > 0:
            kwargs.update(temperature=temperature, top_k=top_k or None, top_p=top_p)
        with torch.inference_mode():
            seqs = self.model.generate(**enc, **kwargs)
        if not self.model.config.is_encoder_decoder:
            seqs = seqs[:, enc["input_ids"].shape[1]:]
        results = []
        for row in seqs.tolist():
            row = [t for t in row if t not in (self.tok.pad_token_id,)]
            reason = "stop" if self.tok.eos_token_id in row else "length"
            row = row[:row.index(self.tok.eos_token_id)] if self.tok.eos_token_id in row else row
            text = self.tok.decode(row, skip_special_tokens=True)
            hit = [text.index(s) for s in stop if s in text]
            results.append(Completion(text[:min(hit)] if hit else text, row, "stop" if hit else reason))
        return results


def generate(model: str | Path, prompts: list[str] | str, max_new_tokens: int = 64, temperature: float = 0.8,
             top_k: int = 0, top_p: float = 1.0, stop: list[str] | tuple = (), seed: int = 0, dtype: str = "auto",
             trust_pickle: bool = False, base: str | Path | None = None) -> list[Completion]:
    """Complete each prompt with `model` (any local reference: model folder, adapter folder, hf:ORG/NAME)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return Generator(model, dtype, trust_pickle, base)(prompts, max_new_tokens, temperature, top_k, top_p, stop, seed)
