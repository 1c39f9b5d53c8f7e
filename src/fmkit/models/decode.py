"""Batched decoding with a static KV cache for Llama-style models, lean enough that the weights' memory traffic
dominates.

transformers' `generate` spends most of a small model's per-token time in Python (cache objects, logits
processors, per-layer module calls) and in matrix products shaped for training. Here the weights are re-laid out
once (q/k/v fused into one matrix, gate/up into another) and the KV cache is one preallocated fp32 tensor per
layer. A prompt runs through PyTorch. Each following step (one token per row) runs all layers in one call to a
small compiled C function (native.py, kernels/decode_step.c): through PyTorch a layer is ~15 operations at 10-20
us of dispatch each, which at batch 1 outweighed reading its weights (4 layers: ~1.1 ms against ~0.25 ms in C).
The output layer is a `Dense` pre-packed for oneDNN (for the 50k-vocab head of the benchmark model at batch 1,
0.24 ms in bf16 and 1.2 ms in fp32 against 1.1 and 1.8 ms for the best plain layout), except one fp32 row, which
the C step streams ~25% faster. Attention and its cache stay in fp32 whatever the weights' dtype: CPU attention
over a bf16 cache measured 4-8x slower at batch 8 (255 against 46 us per layer at 150 positions). The math is
transformers' Llama (RMSNorm, rotate-half RoPE, SwiGLU, GQA); tests pin equal tokens and logits.
"""
from __future__ import annotations

import ctypes
from array import array

import torch
import torch.nn.functional as F

from . import native

# Up to this many rows a single-token step runs in the compiled step rather than oneDNN's matrix products. Greedy
# batches of 32 and 64 rows on 2 cores, tokens/s: the reference model (hidden 256) in bf16 +8% and +3%, in fp32 -6%;
# the quickstart model (hidden 128) in fp32 +43% and +40%, in bf16 2.25x at 32. At 128 rows the reference model in
# fp32 lost 11% and the quickstart model gained only 7%.
NATIVE_MAX_BATCH = 64


def onednn_pack(w: torch.Tensor):
    """w (out, in) re-laid out for oneDNN's matmul kernels, or None where this torch build or dtype lacks them."""
    try:
        # The batch hint only tunes the layout; 8 measured as fast as 1 at batch 1 and faster at batch 8.
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 8)
        probe = torch.ones(1, w.shape[1], dtype=w.dtype)
        if torch.allclose(_packed_linear(probe, packed).float(), (probe @ w.t()).float(), rtol=1e-2, atol=1e-2):
            return packed
    except (AttributeError, RuntimeError, NotImplementedError):
        pass
    return None


def _packed_linear(x, packed):
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


class Dense:
    """y = x @ W.T for a fixed W (out, in): packed once for oneDNN where possible, else kept transposed and
    contiguous so the product is `x @ W.T` (~3x faster than nn.Linear's layout at batch 1). With pack=False the
    weight is kept only as that (in, out) row-major `self.wt`, the layout the compiled step reads."""

    def __init__(self, w: torch.Tensor, dtype: torch.dtype, pack: bool = True):
        w = w.detach().to(dtype).contiguous()
        self.packed = onednn_pack(w) if pack else None
        self.wt = w.t().contiguous() if self.packed is None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _packed_linear(x, self.packed) if self.packed is not None else x @ self.wt


class KVCache(list):
    """One (2, batch, n_kv, length, head_dim) fp32 tensor per layer; `bound` holds the compiled step's view of it."""
    bound = None
    extra = 0   # token rows one step may take beyond one per cache row (prompt chunks); set by new_cache

    @property
    def width(self) -> int:
        """The most token rows one step takes: what the compiled step's scratch is sized for."""
        return self[0].shape[1] + self.extra


class LlamaDecoder:
    """A read-only, inference-only copy of a LlamaForCausalLM's weights with a KV cache.

    Single-token steps of up to NATIVE_MAX_BATCH rows run in the compiled step (native.py) when it builds on this
    machine (`use_native=None`, the default) or when asked (`True`: an error if it cannot); `False` keeps every
    step in PyTorch. Prompts (several tokens per row) always run in PyTorch."""

    def __init__(self, model, dtype: torch.dtype = torch.float32, use_native: bool | None = None):
        cfg = model.config
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps, self.dtype = cfg.rms_norm_eps, dtype
        self.max_positions = cfg.max_position_embeddings
        # the C step knows fp32/bf16 weights and whole GQA groups with even head_dim (what transformers accepts)
        fits = dtype in (torch.float32, torch.bfloat16) and self.n_heads % self.n_kv == 0 and self.head_dim % 2 == 0
        self.native = native.load() if use_native is not False and fits else None
        if use_native and self.native is None:
            why = native.why_not() if fits else f"dtype {dtype} or this head layout is not supported"
            raise RuntimeError(f"the compiled decoding step is unavailable: {why}")
        # The compiled step reads (in, out) weights, and the layers keep that one copy: prompts and steps of more
        # rows through PyTorch then multiply by it as it is, measured 0-15% slower than oneDNN-packed copies.
        pack = self.native is None
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        self.embed = sd["model.embed_tokens.weight"].to(dtype)
        head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
        self.head = Dense(head, dtype)
        # one fp32 row's output layer runs in the compiled step, on the plain (vocab, hidden) weight (no copy)
        self.head_w = head.float().contiguous() if self.native is not None and dtype == torch.float32 else None
        self.norm = sd["model.norm.weight"].to(dtype)
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            qkv = torch.cat([sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"],
                             sd[p + "self_attn.v_proj.weight"]])
            gate_up = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
            self.layers.append((sd[p + "input_layernorm.weight"].to(dtype), Dense(qkv, dtype, pack),
                                Dense(sd[p + "self_attn.o_proj.weight"], dtype, pack),
                                sd[p + "post_attention_layernorm.weight"].to(dtype), Dense(gate_up, dtype, pack),
                                Dense(sd[p + "mlp.down_proj.weight"], dtype, pack)))
        inv_freq = model.model.rotary_emb.inv_freq.detach().float()
        pos = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        scale = getattr(model.model.rotary_emb, "attention_scaling", 1.0)
        self.cos, self.sin = emb.cos() * scale, emb.sin() * scale

    def _rms(self, x, w):
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)

    def _rope(self, x, cos, sin):
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def new_cache(self, batch: int, length: int, width: int = 0) -> KVCache:
        """`batch` rows of `length` slots; `width`: the most token rows one `step_rows` call takes (default
        `batch`), more where prompts are prefilled in the same call as the decoding rows."""
        shape = (2, batch, self.n_kv, length, self.head_dim)
        cache = KVCache(torch.zeros(shape, dtype=torch.float32) for _ in self.layers)
        cache.extra = max(width - batch, 0)
        return cache

    def _native_step(self, ids, positions, cache: KVCache, start: int, key_mask) -> torch.Tensor:
        if cache.bound is None or cache.bound.decoder is not self:
            cache.bound = _Bound(self, cache)
        bound, b = cache.bound, len(ids)
        ids, pos = ids.reshape(-1).to(torch.int64).contiguous(), positions.reshape(-1).to(torch.int64).contiguous()
        mask = None if key_mask is None else key_mask.to(torch.bool).contiguous()  # read as bytes
        # the C step trusts its inputs: check here what PyTorch's indexing would have refused
        id_list, pos_list = ids.tolist(), pos.tolist()
        if len(id_list) != bound.batch or len(pos_list) != b or (mask is not None and (
                mask.dim() != 2 or len(mask) != b or mask.shape[1] <= start)):
            raise ValueError(f"{b} token rows, {len(pos_list)} positions and key mask "
                             f"{None if mask is None else tuple(mask.shape)} do not fit a cache of "
                             f"{bound.batch} rows at slot {start}")
        if not (0 <= min(id_list) <= max(id_list) < len(self.embed) and 0 <= min(pos_list) <= max(pos_list) <
                self.max_positions and 0 <= start < bound.length):
            raise IndexError(f"token id, position or cache slot out of range (ids {id_list}, positions {pos_list}, "
                             f"slot {start} of {bound.length})")
        logits = torch.empty(1, len(self.head_w), dtype=torch.float32) if b == 1 and self.head_w is not None else None
        self.native.fm_step(ctypes.byref(bound.model), ids.data_ptr(), pos.data_ptr(), start,
                            None if mask is None else mask.data_ptr(), 0 if mask is None else mask.shape[1],
                            bound.out.data_ptr(), None if logits is None else logits.data_ptr())
        return logits if logits is not None else self.head(bound.head_in).float()

    @torch.inference_mode()
    def step_rows(self, ids: list[int], rows: list[int], slots: list[int], cache: KVCache,
                  want: list[int] | None = None, raw: bool = False) -> torch.Tensor:
        """Tokens of several sequences that joined at different times, in one call (continuous batching): token i
        belongs to cache row rows[i], goes to slot slots[i] (also its RoPE position) and attends over that row's
        slots [0, slots[i]]. A row may appear several times at consecutive slots: a chunk of its prompt, whose
        tokens attend to each other causally. Logits (len(want), vocab) for the tokens at positions `want` in
        `ids` (default: all), fp32, or with `raw` in the output layer's dtype (the same values before widening).

        In the compiled step every token's arithmetic is the same whatever else is in the call, so a sequence's
        tokens, prompt included, never depend on its neighbours or on how its prompt was split."""
        n, length = len(ids), cache[0].shape[3]
        width = cache.width if isinstance(cache, KVCache) else n
        if not (0 < n <= width and len(rows) == len(slots) == n and 0 <= min(ids) <= max(ids) < len(self.embed)
                and 0 <= min(rows) <= max(rows) < cache[0].shape[1] and len(set(zip(rows, slots))) == n
                and 0 <= min(slots) <= max(slots) < min(length, self.max_positions)):
            raise IndexError(f"token ids {ids}, rows {rows} or slots {slots} do not fit the cache "
                             f"({cache[0].shape[1]} rows of {length} slots, at most {width} tokens a step)")
        if self.native is not None and isinstance(cache, KVCache):
            if cache.bound is None or cache.bound.decoder is not self:
                cache.bound = _Bound(self, cache)
            # the output layer always through oneDNN (not the C loop fm_step uses for one fp32 row): its rows come
            # out the same at any batch size, so a sequence's logits never depend on its neighbours. The step's
            # inputs go over as arrays and the output layer reads the step's own bf16 copy of its input: PyTorch
            # calls in between cost more than their work at this size, and each hands the interpreter lock over.
            bound = cache.bound
            rows_a, ids_a, slots_a = array("q", rows), array("q", ids), array("q", slots)
            self.native.fm_step_rows(ctypes.byref(bound.model), n, rows_a.buffer_info()[0], ids_a.buffer_info()[0],
                                     slots_a.buffer_info()[0], slots_a.buffer_info()[0], bound.out.data_ptr(), None)
            x = bound.head_in[:n]
            if want is not None and want != list(range(n)):
                x = x[torch.tensor(want, dtype=torch.int64)]
            logits = self.head(x)
            return logits if raw else logits.float()
        ids_t, rows_t, slots_t = (torch.tensor(v, dtype=torch.int64) for v in (ids, rows, slots))
        pick = slice(None) if want is None else torch.tensor(want, dtype=torch.int64)
        end = max(slots) + 1
        x = self.embed[ids_t][:, None]
        cos, sin = self.cos[slots_t][:, None, None], self.sin[slots_t][:, None, None]  # (n, 1, 1, D)
        mask = (torch.arange(end)[None] <= slots_t[:, None])[:, None, None]  # (n, 1, 1, end)
        nq, nkv, hd = self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.head_dim
        for (ln1, wqkv, wo, ln2, wgu, wd), kv in zip(self.layers, cache):
            h = wqkv(self._rms(x, ln1)).float()
            qk = self._rope(h[..., :nq + nkv].view(n, 1, self.n_heads + self.n_kv, hd), cos, sin).transpose(1, 2)
            kv[0, rows_t, :, slots_t] = qk[:, self.n_heads:, 0]
            kv[1, rows_t, :, slots_t] = h[:, 0, nq + nkv:].view(n, self.n_kv, hd)
            attn = F.scaled_dot_product_attention(qk[:, :self.n_heads], kv[0, rows_t, :, :end], kv[1, rows_t, :, :end],
                                                  attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
            x = x + wo(attn.transpose(1, 2).reshape(n, 1, nq).to(self.dtype))
            gu = wgu(self._rms(x, ln2))
            half = gu.shape[-1] // 2
            x = x + wd(F.silu(gu[..., :half]) * gu[..., half:])
        logits = self.head(self._rms(x[:, -1][pick], self.norm))
        return logits if raw else logits.float()

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: list[torch.Tensor], start: int,
                key_mask: torch.Tensor | None, every: bool = False) -> torch.Tensor:
        """Logits for the last position of `ids` (B, T) written at cache slots [start, start+T); with `every`,
        (B, T, vocab) for all of them.

        positions (B, T) are the RoPE positions (they differ per row under left padding); key_mask (B, start+T)
        marks real tokens, None when no row is padded.
        """
        b, n = ids.shape
        if n == 1 and not every and self.native is not None and b <= NATIVE_MAX_BATCH and isinstance(cache, KVCache):
            return self._native_step(ids, positions, cache, start, key_mask)
        x = self._layers(ids, positions, cache, start, key_mask)
        return self.head(self._rms(x if every else x[:, -1], self.norm)).float()

    @torch.inference_mode()
    def hidden(self, ids: list[int]) -> torch.Tensor:
        """One sequence's final-normed hidden states (len(ids), hidden), for embeddings (no cache kept)."""
        cache = self.new_cache(1, len(ids))
        x = self._layers(torch.tensor([ids]), torch.arange(len(ids))[None], list(cache), 0, None)
        return self._rms(x[0], self.norm).float()

    def _layers(self, ids, positions, cache, start: int, key_mask) -> torch.Tensor:
        """The residual stream after the last layer for `ids` (B, T) written at cache slots [start, start+T)."""
        b, n = ids.shape
        end = start + n
        x = self.embed[ids]
        cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]  # (B, T, 1, D)
        nq, nkv, hd = self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.head_dim
        if key_mask is not None or n > 1:
            causal = torch.ones(n, end, dtype=torch.bool).tril(start)
            mask = causal[None, None] if key_mask is None else causal[None, None] & key_mask[:, None, None, :end]
        else:
            mask = None
        for (ln1, wqkv, wo, ln2, wgu, wd), kv in zip(self.layers, cache):
            h = wqkv(self._rms(x, ln1)).float()
            qk = self._rope(h[..., :nq + nkv].view(b, n, self.n_heads + self.n_kv, hd), cos, sin).transpose(1, 2)
            kv[0, :, :, start:end] = qk[:, self.n_heads:]
            kv[1, :, :, start:end] = h[..., nq + nkv:].view(b, n, self.n_kv, hd).transpose(1, 2)
            attn = F.scaled_dot_product_attention(qk[:, :self.n_heads], kv[0, :, :, :end], kv[1, :, :, :end],
                                                  attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
            x = x + wo(attn.transpose(1, 2).reshape(b, n, nq).to(self.dtype))
            gu = wgu(self._rms(x, ln2))
            half = gu.shape[-1] // 2
            x = x + wd(F.silu(gu[..., :half]) * gu[..., half:])
        return x


class _Bound:
    """The compiled step's view of a decoder's weights and one cache (the C `Model`): pointers, sizes, scratch, and
    the tensors made for it. Built on a cache's first step and kept on the cache."""

    def __init__(self, dec: LlamaDecoder, cache: KVCache):
        _, self.batch, _, self.length, _ = cache[0].shape
        for kv in cache:
            if kv.dtype != torch.float32 or not kv.is_contiguous() or kv.shape != cache[0].shape:
                raise ValueError("the KV cache must be the fp32 contiguous tensors new_cache() makes")
        self.decoder = dec
        f32 = dict(dtype=torch.float32)
        self.keep = [dec.cos.contiguous(), dec.sin.contiguous(), dec.norm.float().contiguous()]
        ln1 = [layer[0].float().contiguous() for layer in dec.layers]
        ln2 = [layer[3].float().contiguous() for layer in dec.layers]
        self.keep += ln1 + ln2 + list(cache)  # with the decoder's own tensors: all the C step points into

        def ptrs(tensors):
            arr = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
            self.keep.append(arr)
            return arr

        self.width = cache.width
        inter = dec.layers[0][4].wt.shape[1] // 2
        m = native.Model(batch=self.batch, width=self.width, hidden=dec.embed.shape[1], n_heads=dec.n_heads, n_kv=dec.n_kv,
                         head_dim=dec.head_dim, inter=inter, n_layers=len(dec.layers), cache_len=self.length,
                         threads=torch.get_num_threads(), bf16=int(dec.dtype == torch.bfloat16), eps=dec.eps,
                         embed=dec.embed.data_ptr(), cos=self.keep[0].data_ptr(), sin=self.keep[1].data_ptr(),
                         norm=self.keep[2].data_ptr())
        if dec.head_w is not None:
            m.head, m.vocab = dec.head_w.data_ptr(), len(dec.head_w)
        m.ln1, m.ln2 = ptrs(ln1), ptrs(ln2)
        for i, name in enumerate(["wqkv", "wo", "wgu", "wd"]):
            setattr(m, name, ptrs([layer[(1, 2, 4, 5)[i]].wt for layer in dec.layers]))
        m.cache = ptrs(list(cache))
        self.work = torch.empty(dec.native.fm_work_floats(ctypes.byref(m)), **f32)
        m.work = self.work.data_ptr()
        self.model = m
        self.out = torch.empty(self.width, m.hidden, **f32)
        # what the output layer reads: `out` itself, or for bf16 weights the copy the step writes in bf16
        self.head_in = self.out
        if dec.dtype == torch.bfloat16:
            self.head_in = torch.empty(self.width, m.hidden, dtype=torch.bfloat16)
            m.out16 = self.head_in.data_ptr()
