"""`fmkit finetune`: full or LoRA fine-tuning of any Hugging Face-format causal LM on chat / prompt-completion
JSONL, with the loss on assistant tokens only, through the one training loop (checkpoints, resume, metrics).

Output: a model folder (full) or a PEFT adapter folder (LoRA, loads with `peft.PeftModel`), each with `fmkit.json`
lineage; `merge` folds an adapter into its base.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FmkitError
from ..models.reference import ModelRef
from ..train.data import StepBatches
from ..train.loss import IGNORE_INDEX
from ..workspace import Workspace, write_manifest
from .chat_data import validate_jsonl
from .chat_template import choose_encoding, encode_chat
from .training import add_lora, output_dir, parent_name, processes, run_record, save_output, train_config


def _body_and_head(model):
    """(decoder body, LM head) when the model exposes them (Llama-style, also under a PEFT wrapper)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body, head = getattr(inner, "model", None), getattr(inner, "lm_head", None)
    return (body, head) if body is not None and head is not None and head.bias is None else (None, None)


def sft_objective(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Next-token loss on the positions whose target is an assistant token (labels != -100).

    Llama-style models go through the fused, chunked head + cross-entropy (train/loss.py): the batch x length x
    vocab logits are never materialised, and rows without a target cost nothing in the head. A packed batch (several
    examples in a row, `position_ids` restarting at 0 for each) is attended block by block: transformers builds
    the block-diagonal causal mask from the position ids."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    pos = batch.get("position_ids")
    body, head = _body_and_head(model)
    if body is not None:
        from ..train.loss import fused_linear_cross_entropy

        # Padded rows are right-padded, so under the causal mask a real token never sees a pad: the padding mask
        # changes nothing a target depends on, and leaving it out lets attention take the fused causal kernel.
        hidden = body(input_ids=batch["input_ids"], position_ids=pos, use_cache=False).last_hidden_state
        keep = targets != IGNORE_INDEX
        loss, accuracy = fused_linear_cross_entropy(hidden[:, :-1][keep], head.weight, targets[keep],
                                                    accuracy=True)
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       position_ids=pos, use_cache=False).logits[:, :-1]
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        keep = targets != IGNORE_INDEX
        accuracy = (logits.argmax(-1) == targets)[keep].float().mean() if keep.any() else torch.zeros(())
    # mean token accuracy: how often the most likely next token is the assistant's (OpenAI's fine-tuning figure)
    return loss, {"tokens": int((targets != IGNORE_INDEX).sum()), "accuracy": float(accuracy)}


class SFTBatches(StepBatches):
    """Step-indexed batches of tokenised conversations, a pure function of (seed, step).

    `packed`: the micro-batch's examples are laid end to end in rows of up to `pack_width` tokens (a longer
    example gets a row of its own), position ids restarting at each example, instead of one right-padded row per
    example. Same examples, same targets, same loss; no compute spent on padding (about half of a random batch of
    chat examples of mixed length)."""

    def __init__(self, rows: list[tuple[list[int], list[int]]], batch_size: int, grad_accum: int, seed: int,
                 pad_id: int, rank: int = 0, world: int = 1, packed: bool = False, pack_width: int = 1024):
        super().__init__(batch_size, grad_accum, seed, rank, world)
        self.rows, self.pad_id, self.packed, self.pack_width = rows, pad_id, packed, pack_width
        self.targets = [sum(1 for keep in m[1:] if keep) for _, m in rows]   # loss positions per example

    @property
    def tokens_per_step(self) -> int:
        return round(self.global_batch * float(np.mean([len(t) for t, _ in self.rows])))

    def _lines(self, picked) -> list[list[int]]:
        """Which examples share a row: one each (padded), or first-fit up to the pack width (packed)."""
        if not self.packed:
            return [[i] for i in picked]
        width = max(self.pack_width, max(len(self.rows[i][0]) for i in picked))
        lines, used = [], []
        for i in picked:
            n = len(self.rows[i][0])
            slot = next((k for k, u in enumerate(used) if u + n <= width), None)
            if slot is None:
                lines.append([i])
                used.append(n)
            else:
                lines[slot].append(i)
                used[slot] += n
        return lines

    def _collate(self, picked) -> dict:
        lines = self._lines(picked)
        width = max(sum(len(self.rows[i][0]) for i in line) for line in lines)
        ids = torch.full((len(lines), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(lines), width), IGNORE_INDEX, dtype=torch.long)
        pos = torch.zeros((len(lines), width), dtype=torch.long)
        ends = []
        for r, line in enumerate(lines):
            at = 0
            for i in line:
                t, m = self.rows[i]
                n = len(t)
                ids[r, at:at + n] = torch.tensor(t)
                pos[r, at:at + n] = torch.arange(n)
                # an example's first token is never a target (in a packed row it would follow the previous one)
                labels[r, at + 1:at + n] = torch.tensor([x if keep else IGNORE_INDEX for x, keep in zip(t[1:], m[1:])])
                at += n
            # a packed row's padded tail restarts its positions too, so it is a sequence of its own
            pos[r, at:] = torch.arange(width - at)
            ends.append(at)
        if self.packed:
            return {"input_ids": ids, "position_ids": pos, "labels": labels, "tokens": ids}
        attn = (torch.arange(width)[None] < torch.tensor(ends)[:, None]).long()  # right-padded: real tokens first
        return {"input_ids": ids, "attention_mask": attn, "labels": labels, "tokens": ids}

    def get(self, step: int, micro: int) -> dict:
        drawn = self.draw(step, len(self.rows))
        mine = self.share(drawn, micro).tolist()
        # The objective averages over this micro-batch's targets, and micro-batches hold different numbers of
        # them: weighed by its share of the step's targets, the step's gradient is the mean over all of them.
        weight = sum(self.targets[i] for i in mine) * self.grad_accum * self.world / sum(self.targets[i] for i in drawn)
        return {**self._collate(mine), "loss_weight": weight}

    def validation(self, n: int) -> list[dict]:
        return [self._collate(list(range(i, min(i + self.batch_size, len(self.rows)))))
                for i in range(0, min(n * self.batch_size, len(self.rows)), self.batch_size)]


def packing_is_exact(model, rows: list, pad_id: int, n: int = 4) -> bool:
    """Whether this model attends packed rows block by block (transformers does so for models built on its
    masking utilities), checked on the first examples: the packed loss must equal the padded one."""
    sample = list(range(min(n, len(rows))))
    if len(sample) < 2:
        return False
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            padded = SFTBatches(rows, len(sample), 1, 0, pad_id)._collate(sample)
            packed = SFTBatches(rows, len(sample), 1, 0, pad_id, packed=True)._collate(sample)
            a, b = float(sft_objective(model, padded)[0]), float(sft_objective(model, packed)[0])
        return abs(a - b) <= 1e-4 * max(1.0, abs(a))
    except Exception:   # a model whose forward takes no position ids: stay with padded rows
        return False
    finally:
        model.train(was_training)


def tokenize_examples(tok, examples, max_len: int, on_long: str, encode=encode_chat) -> tuple[list, Counter]:
    rows, counts = [], Counter()
    for ex in examples:
        ids, mask = encode(tok, ex.messages)
        if len(ids) > max_len:
            if on_long == "drop":
                counts["dropped: longer than the context"] += 1
                continue
            ids, mask = ids[:max_len], mask[:max_len]
            counts["truncated to the context"] += 1
        if not any(mask[1:]):
            counts["dropped: no assistant tokens left after truncation"] += 1
            continue
        rows.append((ids, mask))
    return rows, counts


def load_quantized(base: ModelRef, device: str):
    """The base model with its linear layers stored in 4-bit NF4 by bitsandbytes (double-quantised), ready for
    QLoRA: the adapters train in the compute dtype on top of the frozen 4-bit weights."""
    try:
        import bitsandbytes  # noqa: F401
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    except ImportError:
        raise FmkitError("QLoRA needs bitsandbytes and peft: pip install 'fmkit[qlora]'") from None
    if base.kind == "adapter":
        raise FmkitError(f"--qlora quantizes a whole model, and {base.spec} is an adapter; merge it first "
                         "(fmkit merge) and fine-tune the merged folder")
    if base.kind == "folder" and not any(base.path.glob("*.safetensors")):
        raise FmkitError(f"{base.spec} has no safetensors weights; QLoRA loads only those (convert the checkpoint "
                         "first)")
    compute = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    net = AutoModelForCausalLM.from_pretrained(base.path or base.name, quantization_config=quant,
                                               device_map={"": device}, use_safetensors=True,
                                               attn_implementation="sdpa")
    for module in net.modules():
        # On CPUs with AVX512-BF16, bitsandbytes repacks the 4-bit weights on the first eval-mode forward (a
        # validation pass) into a layout whose matmul has no backward: training after that would get no
        # gradients through those layers. Keep the trainable layout.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(net, use_gradient_checkpointing=False)


def finetune(model: str | Path, data: str | Path, out: str | Path | None = None, lora: bool = False,
             qlora: bool = False, lora_r: int = 8, lora_alpha: int = 16, target_modules: list[str] | None = None,
             steps: int = 100, lr: float | None = None, batch_size: int = 8, grad_accum: int = 1, max_len: int = 0,
             on_long: str = "truncate", val_data: str | Path | None = None, seed: int = 0, resume: bool = False,
             workspace: str | Path | None = None, template: str = "chat", base: str | Path | None = None,
             on_log: Callable[[dict], None] | None = None, on_checkpoint: Callable | None = None,
             **train_kw) -> Path:
    """Fine-tune a causal language model (full, LoRA or QLoRA) on chat data, with the loss on assistant tokens only.

    The data is validated first; problems are listed as file:line. Training runs in the one loop (checkpoints,
    resume, metrics.jsonl); under torchrun each process trains on its share of every step's examples and the first
    one writes the output. Returns the output folder: a model, or a PEFT adapter with LoRA and QLoRA.

    Args:
        model: Base model reference (model or adapter folder, a model's name in the workspace, or hf:ORG/NAME).
        data: Chat JSONL ({"messages": [...]}) or prompt/completion JSONL.
        out: Output folder (default <workspace>/models/NAME-ft, or NAME-lora).
        lora: Train a LoRA adapter instead of all the weights.
        qlora: Train a LoRA adapter on the base loaded in 4-bit NF4 (bitsandbytes; on the GPU when there is one).
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha (scale = alpha / r).
        target_modules: Linear layers that get LoRA adapters (default q_proj k_proj v_proj o_proj).
        steps: Optimizer steps.
        lr: Peak learning rate (default 2e-4 with LoRA, 3e-5 full).
        batch_size: Examples per micro-batch on each process.
        grad_accum: Micro-batches per optimizer step.
        max_len: Token limit per example (default: the model's context).
        on_long: What to do with examples over the token limit: truncate or drop (each counted).
        val_data: Held-out JSONL in the same format, for the validation loss.
        seed: Seed for the example order and the LoRA initialisation.
        resume: Continue from the newest checkpoint in the output folder.
        workspace: Workspace folder (default $FMKIT_WORKSPACE or ./fmkit-workspace).
        template: Chat template: chat (the model's own; fmkit's for fmkit models), fmkit, none, or a .jinja file.
        base: Base model for an adapter given as MODEL (default: the one the adapter names).

    `on_log(record)` and `on_checkpoint(step, model, record)` (Python only) see each logged record and each saved
    checkpoint, as the loop's `train` describes.
    """
    from ..models.reference import resolve
    from ..train.loop import train

    if on_long not in ("truncate", "drop"):
        raise FmkitError(f"--on-long must be truncate or drop, got '{on_long}'")
    d = processes(train_kw.get("device", "auto"), train_kw.get("parallel", "ddp"))
    ref = resolve(model, base, workspace)
    ref.config()   # a remote or broken reference fails here, before the data is read
    tok = ref.tokenizer()
    encode, template_used = choose_encoding(tok, ref, template)
    examples = validate_jsonl(data)
    lora = lora or qlora
    # QLoRA places the 4-bit weights on the device the loop will use
    net = (load_quantized(ref, d.device) if qlora else ref.load()).train()
    limit = getattr(net.config, "max_position_embeddings", 2048)
    max_len = min(max_len or limit, limit)
    rows, counts = tokenize_examples(tok, examples, max_len, on_long, encode)
    if not rows:
        raise FmkitError(f"{data}: no usable examples after fitting them to {max_len} tokens ({dict(counts)})")
    val_rows = tokenize_examples(tok, validate_jsonl(val_data), max_len, on_long, encode)[0] if val_data else []
    out = output_dir(out, workspace, f"{ref.label}-{'lora' if lora else 'ft'}")
    targets = target_modules or ["q_proj", "k_proj", "v_proj", "o_proj"]
    if lora:
        net = add_lora(net, targets, lora_r, lora_alpha, seed)
    mean_len = round(float(np.mean([len(t) for t, _ in rows])))   # for the FLOPs estimate (MFU)
    cfg = train_config(steps, batch_size, grad_accum, mean_len, lr or (2e-4 if lora else 3e-5), seed,
                       validate=bool(val_rows), **train_kw)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    packed = packing_is_exact(net, rows, pad)
    batches = SFTBatches(rows, cfg.batch_size, cfg.grad_accum, seed, pad, d.rank, d.world, packed=packed)
    val = (SFTBatches(val_rows, cfg.batch_size, 1, seed, pad, packed=packed).validation(cfg.eval_batches)
           if val_rows else [])
    base_id = ref.manifest().get("id", "")
    config = {"model": ref.spec, "data": str(data), "lora": lora, "steps": steps}
    with run_record(d, workspace, "finetune", config, [base_id]) as run:
        started = time.time()
        result = train(net, sft_objective, batches, cfg, out, val_batches=val, resume=resume,
                       run_info={"run_id": run.id}, d=d,
                       on_log=on_log, on_checkpoint=on_checkpoint)
        manifest = {"kind": "adapter" if lora else "model",
                    "method": "qlora" if qlora else "lora" if lora else "full", "parent_model": parent_name(ref),
                    "parent_id": base_id or None, "data": str(Path(data).resolve()), "examples": len(rows),
                    "data_counts": dict(counts), "packed": packed, "steps": result.step,
                    "tokens_seen": result.tokens_seen, "final_metrics": result.history[-1] if result.history else {},
                    "template": template_used, "seconds": round(time.time() - started, 1), "lineage": ref.lineage()}
        if lora:
            manifest.update(lora_r=lora_r, lora_alpha=lora_alpha, target_modules=targets)
        if qlora:
            manifest["quantization"] = "nf4, double-quantised (bitsandbytes)"
        return save_output(net, tok, out, manifest, run, [base_id])


def merge(adapter: str | Path, out: str | Path, base: str | Path | None = None,
          workspace: str | Path | None = None) -> Path:
    """Fold a LoRA adapter into its base model and save the result as a plain model folder.

    The merged model is recorded in the registry with the adapter and its base as parents.

    Args:
        adapter: LoRA adapter folder (written by finetune --lora or dpo --lora), or its name in the workspace.
        out: Where to write the merged model folder.
        base: Base model reference (default: the one the adapter names).
        workspace: Workspace folder (default $FMKIT_WORKSPACE or ./fmkit-workspace).
    """
    from ..models.io import save_model
    from ..models.reference import resolve

    ref = resolve(adapter, base, workspace)
    if ref.kind != "adapter":
        raise FmkitError(f"{ref.spec} is not an adapter folder (no adapter_config.json); nothing to merge")
    if Path(out).resolve() in (ref.path.resolve(), *([ref.base.path.resolve()] if ref.base.path else [])):
        raise FmkitError(f"{out} is the adapter or its base; write the merged model to a new folder")
    merged = ref.load(merge=True)
    manifest = {"kind": "model", "method": "merged lora", "adapter": str(ref.path.resolve()),
                "parent_model": parent_name(ref.base), "lineage": ref.lineage()}
    save_model(merged, out, None, manifest)
    ref.tokenizer().save_pretrained(out)
    parents = [ref.manifest().get("id", ""), ref.base.manifest().get("id", "")]
    manifest["id"] = Workspace(workspace).add_artifact("model", out, manifest, parents=parents)
    write_manifest(out, manifest)
    return Path(out)
