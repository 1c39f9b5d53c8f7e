"""A local causal LM — any local model reference: a model folder (fmkit's or any `transformers` causal LM), an
adapter folder (merged into its base in memory) or hf:ORG/NAME — scored and sampled in batches.

Log-likelihoods follow lm-evaluation-harness exactly: trailing whitespace of the context moves to the
continuation; continuation tokens are enc(context + continuation)[len(enc(context)):]; an empty context is
replaced by the EOS token; no BOS is added; over-long inputs keep their last `max_length` tokens.

Speed: all continuations of one context are scored in ONE forward pass. The context's tokens are followed by
every continuation, each continuation's positions restart where the context ends, and a block mask lets each
continuation see the context and itself only, so the result equals scoring each pair on its own, while the
context is computed once (multiple choice has one context and 2-10 choices). Groups are sorted by length and
batched, so padding is small.
"""
from __future__ import annotations

import math
import queue
import threading
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import FmkitError
from ..models.reference import ModelRef, resolve
from .base import GenRequest, Model, split_pair


class LocalModel(Model):
    capabilities = frozenset({"loglikelihood", "generate", "chat", "embed"})

    def __init__(self, model: str | Path | ModelRef, batch_size: int = 16, dtype: str = "fp32",
                 trust_pickle: bool = False, share_context: bool = True, max_length: int = 0,
                 base: str | Path | None = None):
        super().__init__()
        from ..models.build import arch_of

        self.ref = resolve(model, base)
        self.folder = self.ref.path        # where the tokenizer and fmkit.json live (None for a hub id)
        config = self.ref.config()
        if arch_of(config) != "decoder":
            raise FmkitError(f"{self.ref.spec} is an {arch_of(config)} model; evaluation needs a causal LM "
                             "(decoder)")
        self.model = self.ref.load(trust_pickle)
        if dtype == "bf16":
            self.model = self.model.to(torch.bfloat16)
        self.tok = self.ref.tokenizer()
        self.name = self.ref.label
        self.batch_size = max(1, batch_size)
        self.share_context = share_context
        cfg = self.model.config
        self.max_length = max_length or next((getattr(cfg, k) for k in ("max_position_embeddings", "n_positions",
                                                                          "n_ctx") if getattr(cfg, k, None)), 2048)
        self.prefix_id = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
        self._gen = None

    def describe(self) -> dict:
        m = self.ref.manifest()
        return {"name": self.name, "backend": "local", "reference": self.ref.spec, "kind": self.ref.kind,
                "path": str(self.folder.resolve()) if self.folder else self.ref.name, "id": m.get("id", ""),
                "lineage": self.ref.lineage()}

    # ---- log-likelihoods -------------------------------------------------------------------------------------
    def enc(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return self.encode_pairs([(context, continuation)])[0]

    def encode_pairs(self, requests: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """(context tokens, continuation tokens) per request, with one batched call into the Rust tokenizer."""
        split = [split_pair(context, continuation) for context, continuation in requests]
        strings = sorted({c for c, _ in split if c} | {c + x for c, x in split if c} | {x for c, x in split if not c})
        backend = self.tok.backend_tokenizer
        ids = dict(zip(strings, (e.ids for e in backend.encode_batch(strings, add_special_tokens=False))))
        out = []
        for c, x in split:
            if not c:
                out.append(([self.prefix_id], ids[x]))
            else:
                ctx = ids[c]
                out.append((ctx, ids[c + x][len(ctx):]))
        return out

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool, int]]:
        pairs = self.encode_pairs(requests)
        for (c, x), (ctx, cont) in zip(requests, pairs):
            if not cont:
                raise FmkitError(f"continuation {x!r} encodes to no tokens after context {c[-40:]!r}")
        return self.loglikelihood_tokens(pairs)

    def loglikelihood_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool, int]]:
        """Score (context tokens, continuation tokens) pairs; results in input order."""
        out: list = [None] * len(pairs)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (ctx, cont) in enumerate(pairs):
            if len(cont) > self.max_length:   # its first tokens would have no position to be predicted from
                raise FmkitError(f"a continuation of {len(cont)} tokens does not fit the model's context of "
                                 f"{self.max_length} tokens")
            fits = len(ctx) + len(cont) <= self.max_length + 1
            key = tuple(ctx) if (self.share_context and fits) else ("single", i)
            groups[key].append(i)
        units = []   # (input ids, positions, [(request index, logit rows, target ids)]), one row of the batch each
        for key, idxs in groups.items():
            if key and key[0] == "single":
                ctx, cont = pairs[idxs[0]]
                whole = (ctx + cont)[-(self.max_length + 1):]
                ids = whole[:-1]
                n = len(cont)
                rows = list(range(len(ids) - n, len(ids)))
                units.append((ids, list(range(len(ids))), [(idxs[0], rows, cont)], None))
                continue
            ctx = list(key)
            ids, pos, spans = ctx[:-1], list(range(len(ctx) - 1)), []
            segments = [(0, len(ids))]     # causal runs that each continuation may see: the context
            for i in idxs:
                cont = pairs[i][1]
                start = len(ids)
                # the continuation's input is [last context token] + cont[:-1]; its targets are cont
                ids += [ctx[-1]] + cont[:-1]
                pos += list(range(len(ctx) - 1, len(ctx) - 1 + len(cont)))
                spans.append((i, list(range(start, start + len(cont))), cont))
                segments.append((start, len(ids)))
            units.append((ids, pos, spans, segments))
        units.sort(key=lambda u: -len(u[0]))
        with torch.inference_mode():
            for b in range(0, len(units), self.batch_size):
                self._score_batch(units[b:b + self.batch_size], out)
        return out

    def _score_batch(self, batch, out) -> None:
        width = max(len(u[0]) for u in batch)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        pos = torch.zeros((len(batch), width), dtype=torch.long)
        allowed = torch.zeros((len(batch), width, width), dtype=torch.bool)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        for r, (u_ids, u_pos, _, segments) in enumerate(batch):
            n = len(u_ids)
            ids[r, :n] = torch.tensor(u_ids)
            pos[r, :n] = torch.tensor(u_pos)
            if segments is None:
                allowed[r, :n, :n] = causal[:n, :n]
            else:
                c0, c1 = segments[0]
                allowed[r, c0:c1, c0:c1] = causal[:c1 - c0, :c1 - c0]
                for s0, s1 in segments[1:]:
                    allowed[r, s0:s1, c0:c1] = True                       # every context token
                    allowed[r, s0:s1, s0:s1] = causal[:s1 - s0, :s1 - s0]  # and itself, causally
            allowed[r, n:, :] = False
            allowed[r, torch.arange(n, width), torch.arange(n, width)] = True   # padding sees itself (no NaN)
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros((len(batch), 1, width, width), dtype=dtype).masked_fill(~allowed[:, None],
                                                                                    torch.finfo(dtype).min)
        # The LM head (and its softmax over the vocabulary) is applied only at positions that predict a
        # continuation token, in one matmul per batch: contexts are most tokens and their logits are never used.
        head = getattr(self.model, "lm_head", None)
        body = getattr(self.model, "model", None)
        where = [(r, i, rows, targets) for r, (_, _, spans, _) in enumerate(batch) for i, rows, targets in spans]
        r_idx = torch.tensor([r for r, _, rows, _ in where for _ in rows])
        p_idx = torch.tensor([p for _, _, rows, _ in where for p in rows])
        if head is not None and body is not None:
            hidden = body(input_ids=ids, position_ids=pos, attention_mask=mask).last_hidden_state
            logits = head(hidden[r_idx, p_idx])
        else:
            logits = self.model(input_ids=ids, position_ids=pos, attention_mask=mask).logits[r_idx, p_idx]
        logp_all = torch.log_softmax(logits.float(), dim=-1)
        start = 0
        for r, i, rows, targets in where:
            lp = logp_all[start:start + len(rows)]
            start += len(rows)
            t = torch.tensor(targets)
            out[i] = (lp.gather(-1, t[:, None]).sum().item(), bool((lp.argmax(-1) == t).all()), len(targets))

    def loglikelihood_rolling(self, texts: list[str]) -> list[tuple[float, int]]:
        """Whole-text log-likelihood in disjoint windows of max_length predicted tokens (lm-eval's rolling)."""
        results = []
        for text in texts:
            tokens = self.enc(text)
            pairs, prev = [], [self.prefix_id]
            for s in range(0, len(tokens), self.max_length):
                chunk = tokens[s:s + self.max_length]
                ctx = (prev + tokens[:s])[-(self.max_length - len(chunk) + 1):] if s else prev
                pairs.append((ctx, chunk))
            lls = self.loglikelihood_tokens(pairs) if pairs else []
            results.append((sum(r[0] for r in lls), len(tokens)))
        return results

    def embed(self, texts: list[str]):
        """Mean of the last hidden states over each text's tokens (L2-normalised), one vector per text."""
        out = []
        with torch.inference_mode():
            for b in range(0, len(texts), self.batch_size):
                enc = [self.enc(t)[:self.max_length] or [self.prefix_id] for t in texts[b:b + self.batch_size]]
                width = max(map(len, enc))
                ids = torch.tensor([e + [0] * (width - len(e)) for e in enc])
                mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])
                h = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
                v = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
                out.append(torch.nn.functional.normalize(v.float(), dim=-1))
        return torch.cat(out).numpy()

    # ---- generation ------------------------------------------------------------------------------------------
    def _generator(self):
        from ..models.generate import Generator

        if self._gen is None:
            self._gen = Generator.from_model(self.model, self.tok, dtype="bf16" if self.model.dtype == torch.bfloat16
                                             else "fp32")
        return self._gen

    def generate(self, requests: list[GenRequest]) -> list[str]:
        self._generator()
        out: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            if not isinstance(r.prompt, str):
                raise FmkitError("generate takes text prompts; chat messages go to chat()")
            groups[(tuple(r.until), r.max_tokens, r.temperature, r.seed)].append(i)
        for (until, max_tokens, temperature, seed), idxs in groups.items():
            idxs.sort(key=lambda i: len(requests[i].prompt))
            for b in range(0, len(idxs), self.batch_size):
                part = idxs[b:b + self.batch_size]
                room = self.max_length - max_tokens
                prompts = [self._fit(requests[i].prompt, room) for i in part]
                done = self._gen(prompts, max_new_tokens=max_tokens, temperature=temperature, stop=list(until),
                                 seed=seed)
                for i, c in zip(part, done):
                    out[i] = c.text
        return out

    def _fit(self, prompt: str, room: int) -> str:
        """The prompt, or its last `room` tokens when it is longer than that."""
        ids = self.enc(prompt)
        return prompt if len(ids) <= room else self.tok.decode(ids[-room:])

    def chat(self, requests: list[GenRequest]) -> list[str]:
        return self.generate([self._templated(r) for r in requests])

    def _templated(self, r: GenRequest) -> GenRequest:
        """A chat request as the text prompt the model's chat template makes of it."""
        if not getattr(self.tok, "chat_template", None):
            raise FmkitError(f"{self.ref.spec} has no chat template in its tokenizer config; evaluate with "
                             "`chat: false` (plain prompts), or fine-tune with SFT, which saves one")
        return GenRequest(self.tok.apply_chat_template(r.prompt, tokenize=False, add_generation_prompt=True),
                          r.until, r.max_tokens, r.temperature, r.seed)

    def stream(self, request: GenRequest) -> Iterator[str]:
        """The reply in pieces as its tokens come. The Generator hands them to a callback, so generation runs in a
        thread of its own and the pieces cross over through a queue."""
        if isinstance(request.prompt, list):
            request = self._templated(request)
        prompt = self._fit(request.prompt, self.max_length - request.max_tokens)
        gen, pieces = self._generator(), queue.Queue()

        def run():
            try:
                gen([prompt], max_new_tokens=request.max_tokens, temperature=request.temperature,
                    stop=list(request.until), seed=request.seed, on_text=lambda _row, text: pieces.put(text))
                pieces.put(None)
            except BaseException as e:   # raised again where the pieces are read
                pieces.put(e)

        threading.Thread(target=run, daemon=True).start()
        while (piece := pieces.get()) is not None:
            if isinstance(piece, BaseException):
                raise piece
            yield piece


def bits_per_byte(loglikelihood: float, n_bytes: int) -> float:
    return -loglikelihood / math.log(2) / max(1, n_bytes)


def token_logprobs(model: LocalModel, texts: list[str]) -> list[list[float]]:
    """Log-probability of each token of each text given the tokens before it (the first token given EOS)."""
    pairs = []
    for t in texts:
        ids = model.enc(t)[-model.max_length:]
        pairs.append(([model.prefix_id], ids))
    out = []
    with torch.inference_mode():
        for ctx, ids in pairs:
            x = torch.tensor([ctx + ids[:-1]])
            logp = torch.log_softmax(model.model(input_ids=x).logits.float(), -1)[0]
            out.append(logp.gather(-1, torch.tensor(ids)[:, None])[:, 0].tolist() if ids else [])
    return out
