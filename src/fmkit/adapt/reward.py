"""`fmkit reward`: a reward model — one scalar head on a decoder or an encoder — trained on chosen/rejected pairs
with the Bradley-Terry loss, in the one loop.

loss = -log sigmoid(r(x, y_w) - r(x, y_l)): the probability that the chosen answer beats the rejected one is the
sigmoid of the difference of their scores. The score is a transformers `*ForSequenceClassification` head with one
label (a decoder scores the last real token, an encoder its first); the folder it is saved in loads with plain
transformers, and `score(model, prompts, answers)` scores with it. Data: the preference JSONL `fmkit dpo` reads.
Held-out pairs (`--val-data`, else a seeded `--holdout` share of DATA) give the pairwise accuracy that says
whether the model learnt anything: chance is 0.5.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FmkitError
from ..models.build import arch_of
from ..models.reference import ModelRef, resolve
from ..progress import status
from ..workspace import locate, read_manifest
from .chat_template import choose_encoding
from .dpo import PairBatches, read_pairs
from .training import add_lora, output_dir, parent_name, processes, run_record, save_output, train_config

LORA_TARGETS = {"decoder": ["q_proj", "k_proj", "v_proj", "o_proj"], "encoder": ["query", "value"]}


def pair_encoder(tok, ref: ModelRef, arch: str, template: str, max_len: int) -> tuple[Callable, str]:
    """`encode(prompt messages, answer) -> token ids` as the reward model reads a scored answer, and the template
    used (for fmkit.json). A decoder reads the conversation in its chat template (or texts back to back with
    `none`), cut from the start when too long so that the answer stays; an encoder reads (prompt text, answer) as
    a text pair."""
    if arch == "encoder":
        def encode(prompt: list[dict], answer: str) -> list[int]:
            text = "\n".join(m["content"] for m in prompt)
            return tok(text, answer, truncation=True, max_length=max_len)["input_ids"]
        return encode, "text pair"
    conv, used = choose_encoding(tok, ref, template)
    return (lambda prompt, answer: conv(tok, prompt + [{"role": "assistant", "content": answer}])[0][-max_len:]), used


def bradley_terry_objective(model, batch: dict):
    """Pairwise loss on 2B rows (chosen first, then rejected); logs pairwise accuracy and the mean margin."""
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()
    n = scores.shape[0] // 2
    margin = scores[:n] - scores[n:]
    loss = -F.logsigmoid(margin).mean()
    margin = margin.detach()
    return loss, {"accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean())}


def _scalar_head(ref: ModelRef, pad_id: int, seed: int):
    """The reference's body under a new one-output head (seeded). An adapter is merged into its base first."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    source = ref.base if ref.kind == "adapter" else ref
    where = str(source.path) if source.path is not None else source.name
    net = AutoModelForSequenceClassification.from_pretrained(where, num_labels=1, pad_token_id=pad_id,
                                                             use_safetensors=True)
    if ref.kind == "adapter":
        merged = ref.load()
        prefix = net.base_model_prefix
        getattr(net, prefix).load_state_dict(getattr(merged, prefix, merged).state_dict(), strict=False)
    return net


def _unmasked(rows: list) -> list:
    """Pairs of token ids as PairBatches takes them, (ids, loss mask) each: a reward model reads every token."""
    return [((c, [1] * len(c)), (r, [1] * len(r))) for c, r in rows]


def _pad(seqs: list[list[int]], pad_id: int) -> dict:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, t in enumerate(seqs):
        ids[r, :len(t)], attn[r, :len(t)] = torch.tensor(t), 1
    return {"input_ids": ids, "attention_mask": attn}


class RewardModel:
    """A reward model folder written by `reward`, loaded once: `rm(prompts, answers)` scores answers."""

    def __init__(self, folder: str | Path, workspace: str | Path | None = None, device: str = "cpu"):
        from transformers import AutoModelForSequenceClassification

        self.folder = locate(folder, "models", workspace)
        m = read_manifest(self.folder)
        if m.get("task") != "reward":
            raise FmkitError(f"{self.folder} is not a reward model written by fmkit reward (no task: reward in "
                             "fmkit.json)")
        ref = resolve(self.folder)
        self.tok = ref.tokenizer()
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        template = "none" if m.get("template") == "none" else "chat"
        self.encode, _ = pair_encoder(self.tok, ref, m["arch"], template, m["max_len"])
        self.net = AutoModelForSequenceClassification.from_pretrained(str(self.folder), use_safetensors=True)
        self.net.to(device).eval()
        self.device = device

    @torch.inference_mode()
    def __call__(self, prompts: list, answers: list[str], batch_size: int = 16) -> list[float]:
        if len(prompts) != len(answers):
            raise FmkitError(f"{len(prompts)} prompts but {len(answers)} answers; give one prompt per answer")
        msgs = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
        seqs = [self.encode(p, a) for p, a in zip(msgs, answers)]
        out = []
        for i in range(0, len(seqs), batch_size):
            batch = {k: v.to(self.device) for k, v in _pad(seqs[i:i + batch_size], self.pad).items()}
            out += self.net(**batch).logits[:, 0].float().tolist()
        return out


def score(model: str | Path, prompts: list, answers: list[str], batch_size: int = 16,
          workspace: str | Path | None = None) -> list[float]:
    """Scores of answers to prompts (a string or messages each) under a reward model written by `reward`."""
    return RewardModel(model, workspace)(prompts, answers, batch_size)


def pairwise_accuracy(net, rows: list, pad_id: int, batch_size: int = 16) -> dict:
    """Share of pairs whose chosen answer scores above its rejected one (a tie counts half), with the counts."""
    net.eval()
    wins = losses = 0
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            part = rows[i:i + batch_size]
            enc = _pad([c for c, _ in part] + [r for _, r in part], pad_id)
            enc = {k: v.to(next(net.parameters()).device) for k, v in enc.items()}
            s = net(**enc).logits[:, 0].float()
            margin = s[:len(part)] - s[len(part):]
            wins, losses = wins + int((margin > 0).sum()), losses + int((margin < 0).sum())
    net.train()
    n = len(rows)
    return {"pairs": n, "wins": wins, "losses": losses, "accuracy": (wins + (n - wins - losses) / 2) / max(1, n)}


def reward(model: str | Path, data: str | Path, out: str | Path | None = None, val_data: str | Path | None = None,
           holdout: float = 0.1, lora: bool = False, lora_r: int = 8, lora_alpha: int = 16, steps: int = 100,
           lr: float | None = None, batch_size: int = 8, grad_accum: int = 1, max_len: int = 0, seed: int = 0,
           resume: bool = False, workspace: str | Path | None = None, template: str = "chat",
           base: str | Path | None = None, on_log: Callable[[dict], None] | None = None,
           on_checkpoint: Callable | None = None, **train_kw) -> Path:
    """Train a reward model (a scalar head on a decoder or an encoder) on preference pairs, by the Bradley-Terry loss.

    Validated by pairwise accuracy on held-out pairs (logged as val_accuracy, and in fmkit.json under heldout).
    Saved as a transformers sequence-classification model with one label; with LoRA the adapters are merged into
    it, so the folder always loads without peft. Returns the output folder; score answers with `score`.

    Args:
        model: Model reference to put the head on: a decoder or an encoder (model or adapter folder, a model's name
            in the workspace, or hf:ORG/NAME).
        data: Preference JSONL: prompt/chosen/rejected, or OpenAI's preference format (input, preferred_output,
            non_preferred_output).
        out: Output folder (default <workspace>/models/NAME-reward).
        val_data: Held-out preference JSONL (default: a --holdout share of DATA).
        holdout: Share of DATA's pairs held out for validation when --val-data is not given (0: none).
        lora: Train LoRA adapters on the body (the head is trained in full); merged when saved.
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha (scale = alpha / r).
        steps: Optimizer steps.
        lr: Peak learning rate (default 1e-3 with LoRA, 5e-5 full).
        batch_size: Pairs per micro-batch on each process.
        grad_accum: Micro-batches per optimizer step.
        max_len: Token limit per prompt with its answer (default: the model's context); a decoder keeps the end.
        seed: Seed for the head's initialisation, the hold-out split, the pair order and the LoRA initialisation.
        resume: Continue from the newest checkpoint in the output folder.
        workspace: Workspace folder (default $FMKIT_WORKSPACE or ./fmkit-workspace).
        template: How a decoder reads a conversation: chat (the model's own; fmkit's for fmkit models), fmkit,
            none, or a .jinja file.
        base: Base model for an adapter given as MODEL (default: the one the adapter names).

    `on_log(record)` and `on_checkpoint(step, model, record)` (Python only) see each logged record and each saved
    checkpoint, as the loop's `train` describes.
    """
    from ..train.loop import train

    d = processes(train_kw.get("device", "auto"), train_kw.get("parallel", "ddp"))
    ref = resolve(model, base, workspace)
    config = ref.config()
    arch = arch_of(config)
    if arch not in LORA_TARGETS:
        raise FmkitError(f"{ref.spec} is a {arch} model; a reward model goes on a decoder or an encoder")
    tok = ref.tokenizer()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    limit = getattr(config, "max_position_embeddings", 2048)
    max_len = min(max_len or limit, limit)
    encode, template_used = pair_encoder(tok, ref, arch, template, max_len)
    pairs = read_pairs(data)
    if val_data:
        held = read_pairs(val_data)
    elif not 0 <= holdout < 1:
        raise FmkitError(f"--holdout must be at least 0 and below 1, got {holdout}")
    else:
        order = np.random.default_rng(seed).permutation(len(pairs))
        cut = round(len(pairs) * holdout)
        if holdout and len(pairs) - cut < 1:
            raise FmkitError(f"{data}: {len(pairs)} pair(s) leave none to train on after --holdout {holdout}")
        pairs, held = [pairs[i] for i in order[cut:]], [pairs[i] for i in order[:cut]]

    def rows_of(items):
        return [(encode(p, c), encode(p, r)) for p, c, r in items]

    rows, val_rows = rows_of(pairs), rows_of(held)
    net = _scalar_head(ref, pad, seed)
    if lora:
        net = add_lora(net, LORA_TARGETS[arch], lora_r, lora_alpha, seed, task_type="SEQ_CLS")
    mean_len = round(float(np.mean([len(c) for c, _ in rows])))
    cfg = train_config(steps, batch_size, grad_accum, max(8, mean_len), lr or (1e-3 if lora else 5e-5), seed,
                       validate=bool(val_rows), **train_kw)
    batches = PairBatches(_unmasked(rows), None, cfg.batch_size, cfg.grad_accum, seed, pad, d.rank, d.world)
    held_batches = PairBatches(_unmasked(val_rows), None, batch_size, 1, seed, pad)
    val_batches = [held_batches.collate(list(range(i, min(i + batch_size, len(val_rows)))))
                   for i in range(0, len(val_rows), batch_size)][d.rank::d.world]
    out = output_dir(out, workspace, f"{ref.label}-reward")
    base_id = ref.manifest().get("id", "")
    run_config = {"model": ref.spec, "data": str(data), "lora": lora, "steps": steps}
    with run_record(d, workspace, "reward", run_config, [base_id]) as run:
        started = time.time()
        result = train(net, bradley_terry_objective, batches, cfg, out, val_batches=val_batches or None,
                       resume=resume, run_info={"run_id": run.id}, d=d, on_log=on_log, on_checkpoint=on_checkpoint)
        held_out = pairwise_accuracy(net, val_rows, pad) if val_rows else None
        if held_out:
            status(f"held-out pairwise accuracy {held_out['accuracy']:.3f} on {held_out['pairs']} pairs "
                   f"({held_out['wins']} right, {held_out['losses']} wrong; chance 0.5)")
        if lora:
            net = net.merge_and_unload()
        manifest = {"kind": "model", "task": "reward", "arch": arch, "method": "lora" if lora else "full",
                    "parent_model": parent_name(ref), "parent_id": base_id or None, "max_len": max_len,
                    "data": str(Path(data).resolve()), "pairs": len(rows), "heldout": held_out,
                    "val_data": str(Path(val_data).resolve()) if val_data else None, "template": template_used,
                    "steps": result.step, "final_metrics": result.history[-1] if result.history else {},
                    "seconds": round(time.time() - started, 1)}
        return save_output(net, tok, out, manifest, run, [base_id])
