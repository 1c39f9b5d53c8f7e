"""`fmkit generate`: sample text from a model folder with temperature / top-k / top-p / stop strings."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import FmkitError
from .models.build import arch_of
from .models.decode import LlamaDecoder
from .models.io import load_model
from .tokenize.tokenizer import load_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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

    def __init__(self, model_dir: str | Path, dtype: str = "fp32", trust_pickle: bool = False):
        if dtype not in DTYPES:
            raise FmkitError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
        self.model = load_model(model_dir, trust_pickle=trust_pickle)
        self.tok = load_tokenizer(model_dir)
        arch = arch_of(self.model.config)
        if arch == "encoder":
            raise FmkitError(f"{model_dir} is an encoder (masked LM); it fills masks but does not generate text")
        self.fast = LlamaDecoder(self.model, DTYPES[dtype]) if self.model.config.model_type == "llama" else None

    def __call__(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 0,
                 top_p: float = 1.0, stop: list[str] | tuple = (), seed: int = 0) -> list[Completion]:
        if max_new_tokens < 1:
            raise FmkitError("max_new_tokens must be at least 1")
        gen = torch.Generator().manual_seed(seed)
        if self.fast is None:
            return self._hf_generate(prompts, max_new_tokens, temperature, top_k, top_p, stop, gen)
        tok, dec = self.tok, self.fast
        eos = tok.eos_token_id
        encoded = [tok(p, add_special_tokens=False)["input_ids"] or [eos] for p in prompts]
        width = max(map(len, encoded))
        if width + max_new_tokens > dec.max_positions:
            raise FmkitError(f"prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                             f"{dec.max_positions} positions; shorten the prompt or lower max_new_tokens")
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
        real = torch.tensor([[False] * (width - len(e)) + [True] * len(e) for e in encoded])
        positions = (real.cumsum(-1) - 1).clamp(min=0)
        key_mask = None if real.all() else torch.cat([real, torch.ones(len(prompts), max_new_tokens, dtype=torch.bool)], 1)
        cache = dec.new_cache(len(prompts), width + max_new_tokens)
        logits = dec.forward(ids, positions, cache, 0, key_mask)
        pos = positions[:, -1]
        out = [[] for _ in prompts]
        texts = [""] * len(prompts)
        done = [None] * len(prompts)
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, gen)
            for row, t in enumerate(nxt.tolist()):
                if done[row]:
                    continue
                if t == eos:
                    done[row] = "stop"
                    continue
                out[row].append(t)
                if stop:
                    texts[row] = tok.decode(out[row])
                    if any(s in texts[row] for s in stop):
                        done[row] = "stop"
            if all(done) or i == max_new_tokens - 1:
                break
            pos = pos + 1
            logits = dec.forward(nxt[:, None], pos[:, None], cache, width + i, key_mask)
        results = []
        for row in range(len(prompts)):
            text = texts[row] if stop else tok.decode(out[row])
            hit = [text.index(s) for s in stop if s in text]
            results.append(Completion(text[:min(hit)] if hit else text, out[row], done[row] or "length"))
        return results

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
             top_k: int = 0, top_p: float = 1.0, stop: list[str] | tuple = (), seed: int = 0, dtype: str = "fp32",
             trust_pickle: bool = False) -> list[Completion]:
    """Complete each prompt with the model in folder `model`."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return Generator(model, dtype, trust_pickle)(prompts, max_new_tokens, temperature, top_k, top_p, stop, seed)
