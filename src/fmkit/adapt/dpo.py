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
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..train import parallel
from ..train.data import StepBatches
from ..train.loss import IGNORE_INDEX
from .chat_data import BadLine, read_jsonl
from .chat_template import choose_encoding
from .training import add_lora, output_dir, parent_name, processes, run_record, save_output, train_config


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
    mask = targets != IGNORE_INDEX
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


class PairBatches(StepBatches):
    """Step-indexed batches of preference pairs: this rank's B pairs as 2B rows (chosen first, then rejected),
    with their reference log-probabilities."""

    def __init__(self, rows: list, ref: torch.Tensor | None, batch_size: int, grad_accum: int, seed: int,
                 pad_id: int, rank: int = 0, world: int = 1):
        super().__init__(batch_size, grad_accum, seed, rank, world)
        self.rows, self.ref, self.pad_id = rows, ref, pad_id

    @property
    def tokens_per_step(self) -> int:
        return round(self.global_batch * float(np.mean([len(c) + len(r) for (c, _), (r, _) in self.rows])))

    def collate(self, picked: list[int]) -> dict:
        seqs = [self.rows[i][0] for i in picked] + [self.rows[i][1] for i in picked]
        width = max(len(t) for t, _ in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, (t, m) in enumerate(seqs):
            ids[r, :len(t)] = torch.tensor(t)
            attn[r, :len(t)] = 1
            labels[r, :len(t)] = torch.tensor([x if keep else IGNORE_INDEX for x, keep in zip(t, m)])
        ref = torch.cat([self.ref[picked, 0], self.ref[picked, 1]]) if self.ref is not None else None
        return {"input_ids": ids, "labels": labels, "attention_mask": attn, "ref": ref, "tokens": ids}

    def get(self, step: int, micro: int) -> dict:
        return self.collate(self.share(self.draw(step, len(self.rows)), micro).tolist())


def reference_logps(net, batches: PairBatches, d: parallel.Dist) -> torch.Tensor:
    """(pairs, 2) log-probabilities of each chosen and rejected answer under the starting weights.

    Pairs are scored in fixed chunks of batch_size, dealt out over the ranks and summed back together: every
    rank ends with the values one process would compute, each chunk scored in the same batch, for 1/world of the
    work."""
    n, size = len(batches.rows), batches.batch_size
    ref = torch.zeros((n, 2), device=d.device)
    net.to(d.device).eval()
    with torch.no_grad():
        for chunk, start in enumerate(range(0, n, size)):
            if chunk % d.world != d.rank:
                continue
            b = batches.collate(list(range(start, min(start + size, n))))
            lp = _sequence_logps(net, *(b[k].to(d.device) for k in ("input_ids", "labels", "attention_mask")))
            ref[start:start + size] = lp.view(2, -1).T
    net.train()
    if d.world > 1:
        torch.distributed.all_reduce(ref)
    return ref.cpu()


def dpo(model: str | Path, data: str | Path, out: str | Path | None = None, beta: float = 0.1, lora: bool = False,
        lora_r: int = 8, lora_alpha: int = 16, steps: int = 100, lr: float | None = None, batch_size: int = 4,
        grad_accum: int = 1, max_len: int = 0, seed: int = 0, resume: bool = False,
        workspace: str | Path | None = None, template: str = "chat", base: str | Path | None = None,
        on_log: Callable[[dict], None] | None = None, on_checkpoint: Callable | None = None, **train_kw) -> Path:
    """Align a model on chosen/rejected preference pairs with DPO; logs reward accuracy and margins.

    The reference is the starting model, scored once before training. Under torchrun each process trains on its
    share of every step's pairs and the first one writes the output. Returns the output folder: a model, or a
    PEFT adapter with LoRA.

    Args:
        model: Model reference to align, usually after SFT (model or adapter folder, a model's name in the
            workspace, or hf:ORG/NAME).
        data: Preference JSONL: prompt/chosen/rejected, or OpenAI's preference format (input, preferred_output,
            non_preferred_output).
        out: Output folder (default <workspace>/models/NAME-dpo).
        beta: DPO beta: how far the policy may move from the reference.
        lora: Train a LoRA adapter (the reference is the base without it).
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha (scale = alpha / r).
        steps: Optimizer steps.
        lr: Peak learning rate (default 5e-5 with LoRA, 5e-6 full).
        batch_size: Pairs per micro-batch on each process.
        grad_accum: Micro-batches per optimizer step.
        max_len: Token limit per answer with its prompt (default: the model's context); the prompt start goes first.
        seed: Seed for the pair order and the LoRA initialisation.
        resume: Continue from the newest checkpoint in the output folder.
        workspace: Workspace folder (default $FMKIT_WORKSPACE or ./fmkit-workspace).
        template: Chat template: chat (the model's own; fmkit's for fmkit models), fmkit, none, or a .jinja file.
        base: Base model for an adapter given as MODEL (default: the one the adapter names).

    `on_log(record)` and `on_checkpoint(step, model, record)` (Python only) see each logged record and each saved
    checkpoint, as the loop's `train` describes.
    """
    from ..models.reference import resolve
    from ..train.loop import train

    d = processes(train_kw.get("device", "auto"), train_kw.get("parallel", "ddp"))
    ref = resolve(model, base, workspace)
    ref.config()
    tok = ref.tokenizer()
    encode, template_used = choose_encoding(tok, ref, template)
    pairs = read_pairs(data)
    net = ref.load().train()
    limit = getattr(net.config, "max_position_embeddings", 2048)
    max_len = min(max_len or limit, limit)
    rows = []
    for prompt, chosen, rejected in pairs:
        enc = [encode(tok, prompt + [{"role": "assistant", "content": a}]) for a in (chosen, rejected)]
        if any(len(t) > max_len for t, _ in enc):
            enc = [(t[-max_len:], m[-max_len:]) for t, m in enc]   # keep the answers; the prompt start goes
        rows.append(tuple(enc))
    cfg = train_config(steps, batch_size, grad_accum, max(8, round(float(np.mean([len(c) for (c, _), _ in rows])))),
                       lr or (5e-5 if lora else 5e-6), seed, **train_kw)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batches = PairBatches(rows, None, cfg.batch_size, cfg.grad_accum, seed, pad, d.rank, d.world)
    batches.ref = reference_logps(net, batches, d)
    if lora:
        net = add_lora(net, ["q_proj", "k_proj", "v_proj", "o_proj"], lora_r, lora_alpha, seed)
    out = output_dir(out, workspace, f"{ref.label}-dpo")
    base_id = ref.manifest().get("id", "")
    config = {"model": ref.spec, "data": str(data), "beta": beta, "lora": lora, "steps": steps}
    with run_record(d, workspace, "dpo", config, [base_id]) as run:
        started = time.time()
        result = train(net, dpo_objective(beta), batches, cfg, out, resume=resume, run_info={"run_id": run.id}, d=d,
                       on_log=on_log, on_checkpoint=on_checkpoint)
        manifest = {"kind": "adapter" if lora else "model", "method": "dpo" + (" lora" if lora else ""),
                    "beta": beta, "parent_model": parent_name(ref), "parent_id": base_id or None,
                    "data": str(Path(data).resolve()), "pairs": len(rows), "steps": result.step,
                    "final_metrics": result.history[-1] if result.history else {}, "template": template_used,
                    "seconds": round(time.time() - started, 1)}
        return save_output(net, tok, out, manifest, run, [base_id])
