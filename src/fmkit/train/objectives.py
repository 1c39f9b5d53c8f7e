"""Training objectives: small functions `(model, batch) -> (loss, metrics)` that the one loop calls.

A batch is `{"tokens": LongTensor (B, T+1), "seed": int}`: a window of packed tokens plus a seed for the
objective's own randomness (masking, span choice), derived from (run seed, step, micro-batch, rank) so that a
resumed or re-sharded run draws exactly the same masks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .loss import IGNORE_INDEX, fused_linear_cross_entropy


def causal_lm(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Next-token prediction. Llama-style models skip the logits tensor (fused head + loss, see loss.py)."""
    tokens = batch["tokens"]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    body, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if body is not None and head is not None and head.bias is None:
        hidden = body(input_ids=inputs).last_hidden_state
        loss = fused_linear_cross_entropy(hidden, head.weight, targets)
    else:
        logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    return loss, {"tokens": targets.numel()}


def mask_tokens(tokens: torch.Tensor, mask_id: int, vocab_size: int, generator: torch.Generator,
                rate: float = 0.15, special_ids: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose `rate` of positions; of those 80% -> [MASK], 10% -> random token, 10% unchanged."""
    labels = tokens.clone()
    probs = torch.full(tokens.shape, rate)
    for sid in special_ids:
        probs[tokens == sid] = 0.0
    chosen = torch.bernoulli(probs, generator=generator).bool()
    labels[~chosen] = IGNORE_INDEX
    inputs = tokens.clone()
    roll = torch.rand(tokens.shape, generator=generator)
    inputs[chosen & (roll < 0.8)] = mask_id
    randomise = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[randomise] = torch.randint(vocab_size, tokens.shape, generator=generator)[randomise]
    return inputs, labels


def masked_lm(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Masked language modelling (BERT): predict the 15% of tokens chosen by `mask_tokens`."""
    cfg = model.config
    gen = torch.Generator().manual_seed(batch["seed"])
    tokens = batch["tokens"][:, :-1].cpu()
    inputs, labels = mask_tokens(tokens, batch["mask_id"], cfg.vocab_size, gen, special_ids=(cfg.pad_token_id,))
    device = batch["tokens"].device
    logits = model(input_ids=inputs.to(device)).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.to(device).flatten(), ignore_index=IGNORE_INDEX)
    return loss, {"tokens": int((labels != IGNORE_INDEX).sum())}


def span_corrupt(tokens: torch.Tensor, sentinel_ids: list[int], eos_id: int, pad_id: int,
                 generator: torch.Generator, noise_density: float = 0.15, mean_span: float = 3.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 span corruption: replace random spans (15% of tokens, mean length 3) by sentinels in the input; the
    target lists each sentinel followed by the tokens it hid. Returns right-padded (inputs, labels)."""
    rows_in, rows_out = [], []
    length = tokens.shape[1]
    n_noise = max(1, round(length * noise_density))
    n_spans = max(1, min(round(n_noise / mean_span), len(sentinel_ids), n_noise))
    for row in tokens.tolist():
        # Split the noise and non-noise lengths into n_spans random positive parts each, then interleave.
        noise = _random_partition(n_noise, n_spans, generator)
        keep = _random_partition(length - n_noise, n_spans, generator)
        inp, out, pos = [], [], 0
        for i in range(n_spans):
            inp += row[pos:pos + keep[i]] + [sentinel_ids[i]]
            pos += keep[i]
            out += [sentinel_ids[i]] + row[pos:pos + noise[i]]
            pos += noise[i]
        rows_in.append(inp + [eos_id])
        rows_out.append(out + [eos_id])
    return _pad(rows_in, pad_id), _pad(rows_out, IGNORE_INDEX)


def _random_partition(total: int, parts: int, generator: torch.Generator) -> list[int]:
    if total < parts:
        return [1] * total + [0] * (parts - total)
    cuts = sorted(torch.randperm(total - 1, generator=generator)[:parts - 1].add(1).tolist())
    return [b - a for a, b in zip([0] + cuts, cuts + [total])]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def span_corruption(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Encoder-decoder pre-training (T5): reconstruct the corrupted spans."""
    cfg = model.config
    gen = torch.Generator().manual_seed(batch["seed"])
    inputs, labels = span_corrupt(batch["tokens"][:, :-1].cpu(), batch["sentinel_ids"], cfg.eos_token_id,
                                  cfg.pad_token_id, gen)
    device = batch["tokens"].device
    inputs, labels = inputs.to(device), labels.to(device)
    out = model(input_ids=inputs, attention_mask=(inputs != cfg.pad_token_id).long(), labels=labels)
    return out.loss, {"tokens": int((labels != IGNORE_INDEX).sum())}


OBJECTIVES = {"causal_lm": causal_lm, "masked_lm": masked_lm, "span_corruption": span_corruption}
