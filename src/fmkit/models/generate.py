"""Generation for every model reference: temperature / top-k / top-p / stop strings; Llama-style decoders run on
the KV-cache decoder (decode.py), other architectures through transformers' generate. `fmkit generate`, `fmkit
chat`, the local provider and the server all complete text through `Generator`."""
from __future__ import annotations

from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch

from ..errors import FmkitError
from ..progress import warn
from .build import arch_of
from . import native
from .decode import LlamaDecoder
from .reference import ModelRef, resolve

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str) -> str:
    """`auto`: bf16 where this CPU has bf16 instructions (it halves the bytes a step reads), else fp32."""
    if dtype == "auto":
        from ..runtime import decode_in_bf16
        return "bf16" if decode_in_bf16() else "fp32"
    if dtype not in DTYPES:
        raise FmkitError(f"dtype must be auto, {' or '.join(DTYPES)}, got '{dtype}'")
    return dtype


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    dtype: str = ""     # what the model computed in (fp32 or bf16)


def argmax_rows(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """x.argmax(-1) for a (rows, vocab) tensor, the same indices (the first maximum; NaN counts as the maximum),
    ~7x faster on a CPU: PyTorch's argmax is a scalar loop, while the max of each block of `block` values is
    vectorised, and only the winning block is searched."""
    if x.dim() != 2 or not len(x) or x.shape[1] < block:
        return x.argmax(-1)
    b, v = x.shape
    full = v // block * block
    blocks = x[:, :full].reshape(b, -1, block)
    k = blocks.amax(-1).argmax(-1)   # the first block holding the row's maximum
    rows = torch.arange(b)
    best = k * block + blocks[rows, k].argmax(-1)
    if full < v:   # the values past the last whole block win only if strictly larger (or NaN where best is not)
        top, at = x[:, full:].max(-1)
        here = x[rows, best]
        best = torch.where((top > here) | (top.isnan() & ~here.isnan()), full + at, best)
    return best


def argmax_ids(x: torch.Tensor, rows: int | None = None) -> list[int]:
    """`argmax_rows(x[:rows]).tolist()`, in one call of the compiled kernel where it is built and x is a contiguous
    fp32 or bf16 (rows, vocab) tensor: the same indices, without the half-dozen PyTorch operations (each handing
    over the interpreter lock) that cost more than the search on a decoding step's logits."""
    rows = len(x) if rows is None else min(rows, len(x))   # as x[:rows] would: never past the tensor
    lib = native.load()
    if (lib is None or x.dim() != 2 or x.dtype not in (torch.float32, torch.bfloat16) or not x.is_contiguous()
            or x.device.type != "cpu" or not x.shape[1]):
        return argmax_rows(x[:rows]).tolist()
    out = array("q", bytes(8 * rows))
    if rows:
        lib.fm_argmax_rows(x.data_ptr(), rows, x.shape[1], int(x.dtype == torch.bfloat16), torch.get_num_threads(),
                           out.buffer_info()[0])
    return out.tolist()


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else softmax sampling restricted by top-k then top-p."""
    if temperature <= 0:
        return argmax_rows(logits)
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


class IncrementalText:
    """A completion's text as its tokens arrive, decoding only the newest few each time (a whole decode per token
    is quadratic in the reply's length). The text grows only where it is final: not inside a UTF-8 character
    still being spelled out byte by byte, and with the spacing the whole sequence decodes to."""

    def __init__(self, tok):
        self.tok, self.text, self.prefix, self.read = tok, "", 0, 0

    def add(self, tokens: list[int]) -> str:
        before = self.tok.decode(tokens[self.prefix:self.read])
        now = self.tok.decode(tokens[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(tokens)
        return self.text


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

    @property
    def max_positions(self) -> int:
        """How many tokens (prompt + completion) the model attends over."""
        from .build import max_positions

        return self.fast.max_positions if self.fast is not None else max_positions(self.model.config)

    def __call__(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 0,
                 top_p: float = 1.0, stop: list[str] | tuple = (), seed: int = 0,
                 on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
        """Complete each prompt. `on_text(row, text)` receives each row's completion as it grows, in pieces that
        never end inside a UTF-8 character or a possible stop string (Llama-style decoders; others at the end)."""
        if max_new_tokens < 1:
            raise FmkitError("max_new_tokens must be at least 1")
        if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
            raise FmkitError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1 (got temperature "
                             f"{temperature}, top_k {top_k}, top_p {top_p})")
        gen = torch.Generator().manual_seed(seed)
        if self.fast is None:
            done = self._hf_generate(prompts, max_new_tokens, temperature, top_k, top_p, stop, gen)
            for row, c in enumerate(done if on_text else ()):
                on_text(row, c.text)
            return done
        tok = self.tok
        eos = tok.eos_token_id
        encoded = [tok(p, add_special_tokens=False)["input_ids"] or [eos] for p in prompts]
        texts = [IncrementalText(tok) for _ in prompts]
        shown = [0] * len(prompts)
        hold = max((len(s) for s in stop), default=1) - 1

        def after_token(row: int, tokens: list[int]) -> bool:
            text = texts[row].add(tokens)
            if any(s in text[-(hold + 16):] for s in stop):
                return True
            safe = len(text) - hold
            if on_text and safe > shown[row]:
                on_text(row, text[shown[row]:safe])
                shown[row] = safe
            return False

        rows = self.generate_ids(encoded, max_new_tokens, temperature, top_k, top_p, eos,
                                 after_token if stop or on_text else None, gen)
        results = []
        for row, (tokens, reason) in enumerate(rows):
            text = tok.decode(tokens)
            hit = [text.index(s) for s in stop if s in text]
            results.append(Completion(text[:min(hit)] if hit else text, tokens, reason, self.dtype))
            if on_text and len(results[-1].text) > shown[row]:
                on_text(row, results[-1].text[shown[row]:])
        return results

    def generate_ids(self, encoded: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, eos: int | None = None, should_stop=None,
                     generator: torch.Generator | None = None) -> list[tuple[list[int], str]]:
        """Token-level generation on the fast path: new tokens and finish reason per prompt (left-padded batch).
        `should_stop(row, tokens)` is asked after each new token of a row; True ends that row."""
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
                if should_stop and should_stop(row, out[row]):
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
            results.append(Completion(text[:min(hit)] if hit else text, row, "stop" if hit else reason, self.dtype))
        return results


def generate(model: str, prompts: list[str] | str = ("def ",), max_new_tokens: int = 64, temperature: float = 0.8,
             top_k: int = 0, top_p: float = 1.0, stop: list[str] | None = None, seed: int = 0,
             dtype: Literal["auto", "fp32", "bf16"] = "auto", base: str | None = None, trust_pickle: bool = False,
             workspace: str | Path | None = None) -> list[Completion]:
    """Generate text from a model with a KV cache, one completion per prompt.

    Llama-style decoders decode in fmkit's own step (compiled C where a compiler is present); other architectures
    go through transformers' generate. On the command line, escapes such as \\n in stop strings are read as the
    characters they stand for (`--stop '\\n\\n'`).

    Args:
        model: Model reference: a model or adapter folder, a model name in the workspace, or hf:ORG/NAME.
        prompts: Prompt to complete; repeat for a batch.
        max_new_tokens: Tokens to generate per prompt.
        temperature: Sampling temperature; 0 is greedy.
        top_k: Sample from the k most likely tokens (0: off).
        top_p: Nucleus sampling mass (1.0: off).
        stop: Stop when this string appears (not included in the output); repeatable.
        seed: Sampling seed.
        dtype: auto (bf16 on CPUs with bf16 instructions, 1.2-2x as fast; else fp32, exact), fp32 or bf16.
        base: An adapter's base model, instead of the one the adapter names.
        trust_pickle: Allow pickle weights (loading them can run code).
        workspace: Workspace folder where bare model names are looked up (default $FMKIT_WORKSPACE or
            ./fmkit-workspace).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    gen = Generator(resolve(model, base, workspace), dtype, trust_pickle)
    if gen.fast is not None and gen.fast.native is None:
        from .native import why_not

        warn(f"decoding steps run in PyTorch, slower: {why_not() or 'unsupported model layout'}")
    return gen(prompts, max_new_tokens, temperature, top_k, top_p, list(stop or ()), seed)
