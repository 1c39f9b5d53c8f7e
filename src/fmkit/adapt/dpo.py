"""`fmkit dpo`: Direct Preference Optimization (Rafailov et al. 2023) on chosen/rejected pairs, in the one loop.

loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))
The reference is the frozen starting model (for LoRA: the same weights with the adapter off). Its
log-probabilities are computed once before training, so each step costs one policy forward over both answers.
Logged: reward accuracy (share of pairs whose chosen implicit reward beats the rejected one), the reward margin, and
both rewards.

Data: JSONL lines `{"prompt": str | messages, "chosen": str, "rejected": str}`, or OpenAI's preference format
`{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": ...}],
"non_preferred_output": [...]}`; problems are reported as file:line.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..workspace import Workspace
from .chat_data import BadLine, read_jsonl
from .chat_template import choose_encoding
from .finetune import IGNORE, add_lora, parent_name, save_trained


def _pair(row) -> tuple[list, str, str]:
    if isinstance(row, dict) and "input" in row:
        prompt = row["input"].get("messages") if isinstance(row["input"], dict) else None
        pick = lambda k: (row.get(k) or [{}])[0].get("content") if isinstance(row.get(k), list) else None  # noqa: E731
        chosen, rejected = pick("preferred_output"), pick("non_preferred_output")
    elif isinstance(row, dict):
        prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
    else:
        raise BadLine("each line must be a JSON object")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt):
        raise BadLine("'prompt' must be a string or a list of messages with text content")
    if not isinstance(chosen, str) or not isinstance(rejected, str) or not chosen.strip() or not rejected.strip():
        raise BadLine("'chosen' and 'rejected' must both be non-empty strings")
    if chosen == rejected:
        raise BadLine("'chosen' and 'rejected' are the same text")
    return prompt, chosen, rejected


def read_pairs(path: str | Path) -> list[tuple[list, str, str]]:
    """(prompt messages, chosen, rejected) per line: prompt/chosen/rejected, or OpenAI's preference format."""
    return read_jsonl(path, _pair, "preference data", "preference pairs")


def _sequence_logps(model, ids: torch.Tensor, labels: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities of the labelled (answer) tokens of each row."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE
    lp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (lp * mask).sum(-1)


def dpo_objective(beta: float):
    def objective(model, batch: dict):
        logps = _sequence_logps(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
        n = logps.shape[0] // 2
        chosen = beta * (logps[:n] - batch["ref"][:n])
        rejected = beta * (logps[n:] - batch["ref"][n:])
        loss = -F.logsigmoid(chosen - rejected).mean()
        chosen, rejected = chosen.detach(), rejected.detach()
        return loss, {"reward_accuracy": float((chosen > rejected).float().mean()),
                      "reward_margin": float((chosen - rejected).mean()),
                      "reward_chosen": float(chosen.mean()), "reward_rejected": float(rejected.mean())}
    return objective


class PairBatches:
    """Step-indexed batches: B pairs as 2B rows (chosen first, then rejected), with reference log-probs."""

    def __init__(self, rows: list, ref: torch.Tensor, batch_size: int, seed: int, pad_id: int):
        self.rows, self.ref, self.batch_size, self.seed, self.pad_id = rows, ref, batch_size, seed, pad_id
        self.grad_accum, self.world = 1, 1

    @property
    def global_batch(self) -> int:
        return self.batch_size

    @property
    def tokens_per_step(self) -> int:
        return round(self.batch_size * float(np.mean([len(c) + len(r) for c, r in self.rows])))

    def collate(self, picked: list[int]) -> dict:
        seqs = [self.rows[i][0] for i in picked] + [self.rows[i][1] for i in picked]
        width = max(len(t) for t, _ in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, (t, m) in enumerate(seqs):
            ids[r, :len(t)] = torch.tensor(t)
            attn[r, :len(t)] = 1
            labels[r, :len(t)] = torch.tensor([x if keep else IGNORE for x, keep in zip(t, m)])
        ref = torch.cat([self.ref[picked, 0], self.ref[picked, 1]]) if self.ref is not None else None
        return {"input_ids": ids, "labels": labels, "attention_mask": attn, "ref": ref, "tokens": ids}

    def get(self, step: int, micro: int) -> dict:
        rng = np.random.default_rng([self.seed, step])
        picked = rng.choice(len(self.rows), size=self.batch_size, replace=len(self.rows) < self.batch_size)
        return self.collate(picked.tolist())


def dpo(model: str | Path, data: str | Path, out: str | Path | None = None, beta: float = 0.1, lora: bool = False,
        lora_r: int = 8, lora_alpha: int = 16, steps: int = 100, lr: float | None = None, batch_size: int = 4,
        max_len: int = 0, seed: int = 0, workspace: str | Path | None = None, template: str = "chat",
        base: str | Path | None = None, **train_kw) -> Path:
    """Align `model` (any local model reference; an adapter is merged into its base first) on preference pairs with
    DPO; returns the output folder (model, or LoRA adapter)."""
    from ..models.reference import resolve
    from ..train.loop import train

    base = resolve(model, base)
    base.config()
    tok = base.tokenizer()
    encode, template_used = choose_encoding(tok, base, template)
    pairs = read_pairs(data)
    net = base.load().train()
    limit = getattr(net.config, "max_position_embeddings", 2048)
    max_len = min(max_len or limit, limit)
    rows = []
    for prompt, chosen, rejected in pairs:
        enc = [encode(tok, prompt + [{"role": "assistant", "content": a}]) for a in (chosen, rejected)]
        if any(len(t) > max_len for t, _ in enc):
            enc = [(t[-max_len:], m[-max_len:]) for t, m in enc]   # keep the answers; the prompt start goes
        rows.append(tuple(enc))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batches = PairBatches(rows, None, batch_size, seed, pad)
    with torch.inference_mode():   # the reference: the starting weights, scored once
        net.eval()
        ref = []
        for i in range(0, len(rows), batch_size):
            b = batches.collate(list(range(i, min(i + batch_size, len(rows)))))
            lp = _sequence_logps(net, b["input_ids"], b["labels"], b["attention_mask"])
            n = lp.shape[0] // 2
            ref += list(zip(lp[:n].tolist(), lp[n:].tolist()))
        net.train()
    batches.ref = torch.tensor(ref)
    if lora:
        net, _ = add_lora(net, ["q_proj", "k_proj", "v_proj", "o_proj"], lora_r, lora_alpha, seed)
    ws = Workspace(workspace)
    out = Path(out) if out else ws.path("models", f"{base.label}-dpo")
    cfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=max(8, round(float(np.mean(
        [len(c) for c, _ in rows])))), lr=lr or (5e-5 if lora else 5e-6), warmup_steps=min(10, steps // 10),
        weight_decay=0.0, eval_every=steps + 1, save_every=max(1, steps // 2), keep_last=1,
        log_every=max(1, steps // 20), seed=seed, precision="fp32")
    cfg = replace(cfg, **train_kw)
    base_id = base.manifest().get("id", "")
    run_id = ws.start_run("dpo", {"model": base.spec, "data": str(data), "beta": beta, "steps": steps}, [base_id])
    started = time.time()
    result = train(net, dpo_objective(beta), batches, cfg, out)
    manifest = {"kind": "adapter" if lora else "model", "method": "dpo" + (" lora" if lora else ""), "beta": beta,
                "parent_model": parent_name(base), "parent_id": base_id or None, "data": str(Path(data).resolve()),
                "pairs": len(rows), "steps": result.step, "final_metrics": result.history[-1] if result.history else {},
                "template": template_used, "run_id": run_id, "seconds": round(time.time() - started, 1)}
    return save_trained(net, tok, out, lora, manifest, ws, base_id, run_id)
