"""`fmkit finetune`: full or LoRA fine-tuning of any Hugging Face-format causal LM on chat / prompt-completion
JSONL, with the loss on assistant tokens only, through the one training loop (checkpoints, resume, metrics).

Output: a model folder (full) or a PEFT adapter folder (LoRA, loads with `peft.PeftModel`), each with `fmkit.json`
lineage; `merge` folds an adapter into its base.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..errors import FmkitError
from ..models.reference import ModelRef
from ..workspace import Workspace, write_manifest
from .chat_data import validate_jsonl
from .chat_template import choose_encoding, encode_chat

IGNORE = -100


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
        keep = targets != IGNORE
        loss = fused_linear_cross_entropy(hidden[:, :-1][keep], head.weight, targets[keep])
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       position_ids=pos, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    return loss, {"tokens": int((targets != IGNORE).sum())}


class SFTBatches:
    """Step-indexed batches of tokenised conversations, a pure function of (seed, step).

    `packed`: the micro-batch's examples are laid end to end in rows of up to `pack_width` tokens (a longer
    example gets a row of its own), position ids restarting at each example, instead of one right-padded row per
    example. Same examples, same targets, same loss; no compute spent on padding (about half of a random batch of
    chat examples of mixed length)."""

    def __init__(self, rows: list[tuple[list[int], list[int]]], batch_size: int, grad_accum: int, seed: int,
                 pad_id: int, rank: int = 0, world: int = 1, packed: bool = False, pack_width: int = 1024):
        self.rows, self.batch_size, self.grad_accum, self.seed = rows, batch_size, grad_accum, seed
        self.pad_id, self.rank, self.world = pad_id, rank, world
        self.packed, self.pack_width = packed, pack_width

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world

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
        labels = torch.full((len(lines), width), IGNORE, dtype=torch.long)
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
                labels[r, at + 1:at + n] = torch.tensor([tok if keep else IGNORE for tok, keep in zip(t[1:], m[1:])])
                at += n
            # a packed row's padded tail restarts its positions too, so it is a sequence of its own
            pos[r, at:] = torch.arange(width - at)
            ends.append(at)
        if self.packed:
            return {"input_ids": ids, "position_ids": pos, "labels": labels, "tokens": ids}
        attn = (torch.arange(width)[None] < torch.tensor(ends)[:, None]).long()  # right-padded: real tokens first
        return {"input_ids": ids, "attention_mask": attn, "labels": labels, "tokens": ids}

    def get(self, step: int, micro: int) -> dict:
        rng = np.random.default_rng([self.seed, step])
        order = rng.choice(len(self.rows), size=self.global_batch, replace=len(self.rows) < self.global_batch)
        part = micro * self.world + self.rank
        return self._collate(order[part * self.batch_size:(part + 1) * self.batch_size].tolist())

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


def lora_targets(model, wanted: list[str]) -> list[str]:
    """Check LoRA target module names against the model; the error lists the ones that exist."""
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    missing = [w for w in wanted if w not in linear]
    if missing:
        raise FmkitError(f"LoRA target module(s) {', '.join(missing)} not in this model; its linear layers are: "
                         f"{', '.join(linear)}")
    return wanted


def add_lora(net, wanted: list[str], r: int, alpha: int, seed: int):
    """`net` wrapped by peft with LoRA adapters on the `wanted` linear layers (checked by `lora_targets`), their
    random init seeded so the same run gives the same adapter; returns (model, targets)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise FmkitError("LoRA needs peft: pip install 'fmkit[adapt]'") from None
    targets = lora_targets(net, wanted)
    torch.manual_seed(seed)
    return get_peft_model(net, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                                          task_type="CAUSAL_LM")), targets


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
    net = AutoModelForCausalLM.from_pretrained(base.path or base.name, quantization_config=quant, device_map={"": device},
                                               use_safetensors=True, attn_implementation="sdpa")
    for module in net.modules():
        # On CPUs with AVX512-BF16, bitsandbytes repacks the 4-bit weights on the first eval-mode forward (a
        # validation pass) into a layout whose matmul has no backward: training after that would get no
        # gradients through those layers. Keep the trainable layout.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(net, use_gradient_checkpointing=False)


def finetune(model: str | Path, data: str | Path, out: str | Path | None = None, lora: bool = False,
             qlora: bool = False, lora_r: int = 8, lora_alpha: int = 16, lora_targets_: list[str] | None = None,
             steps: int = 100, lr: float | None = None, batch_size: int = 8, grad_accum: int = 1, max_len: int = 0,
             on_long: str = "truncate", val_data: str | Path | None = None, seed: int = 0, resume: bool = False,
             workspace: str | Path | None = None, template: str = "chat", base: str | Path | None = None,
             **train_kw) -> Path:
    """Fine-tune `model` (any local model reference; an adapter is merged into its base first, or into `base`) on
    `data`; returns the output folder (model or LoRA adapter). `qlora`: LoRA on the base
    loaded in 4-bit NF4 (bitsandbytes; on a GPU when there is one, else the CPU). `template`: chat (the
    model's own chat template; fmkit's for fmkit models without one), fmkit, none, or a .jinja file
    (`chat_template.choose_encoding`)."""
    from ..models.reference import resolve
    from ..train.loop import train

    if on_long not in ("truncate", "drop"):
        raise FmkitError("on_long must be truncate or drop")
    base = resolve(model, base)
    base.config()   # a remote or broken reference fails here, before the data is read
    tok = base.tokenizer()
    encode, template_used = choose_encoding(tok, base, template)
    examples = validate_jsonl(data)
    lora = lora or qlora
    if qlora:
        from ..train import parallel

        # the device the training loop will use (same rules and errors), so the 4-bit weights are placed there
        net = load_quantized(base, parallel.init(train_kw.get("device", "auto")).device).train()
    else:
        net = base.load().train()
    limit = net.config.max_position_embeddings if hasattr(net.config, "max_position_embeddings") else 2048
    max_len = min(max_len or limit, limit)
    rows, counts = tokenize_examples(tok, examples, max_len, on_long, encode)
    if not rows:
        raise FmkitError(f"{data}: no usable examples after fitting them to {max_len} tokens ({dict(counts)})")
    val_rows = tokenize_examples(tok, validate_jsonl(val_data), max_len, on_long, encode)[0] if val_data else []
    ws = Workspace(workspace)
    out = Path(out) if out else ws.path("models", f"{base.label}-{'lora' if lora else 'ft'}")
    if lora:
        net, targets = add_lora(net, lora_targets_ or ["q_proj", "k_proj", "v_proj", "o_proj"], lora_r, lora_alpha,
                                seed)
    mean_len = round(float(np.mean([len(t) for t, _ in rows])))   # for the FLOPs estimate (MFU)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=mean_len,
                      lr=lr or (2e-4 if lora else 3e-5), warmup_steps=min(10, steps // 10), weight_decay=0.0,
                      eval_every=max(1, steps // 4) if val_rows else steps + 1, save_every=max(1, steps // 2),
                      keep_last=1, log_every=max(1, steps // 20), seed=seed, precision="fp32")
    cfg = replace(cfg, **train_kw)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    packed = packing_is_exact(net, rows, pad)
    batches = SFTBatches(rows, cfg.batch_size, cfg.grad_accum, seed, pad, packed=packed)
    val = (SFTBatches(val_rows, cfg.batch_size, 1, seed, pad, packed=packed).validation(cfg.eval_batches)
           if val_rows else [])
    base_id = base.manifest().get("id", "")
    run_id = ws.start_run("finetune", {"model": base.spec, "data": str(data), "lora": lora, "steps": steps},
                          [base_id])
    started = time.time()
    result = train(net, sft_objective, batches, cfg, out, val_batches=val, resume=resume)
    manifest = {"kind": "adapter" if lora else "model", "method": "qlora" if qlora else "lora" if lora else "full",
                "parent_model": parent_name(base), "parent_id": base_id or None, "data": str(Path(data).resolve()),
                "examples": len(rows), "data_counts": dict(counts), "packed": packed, "steps": result.step,
                "tokens_seen": result.tokens_seen, "final_metrics": result.history[-1] if result.history else {},
                "template": template_used, "run_id": run_id, "seconds": round(time.time() - started, 1),
                "lineage": base.lineage()}
    if lora:
        manifest.update(lora_r=lora_r, lora_alpha=lora_alpha, target_modules=targets)
    if qlora:
        manifest["quantization"] = "nf4, double-quantised (bitsandbytes)"
    return save_trained(net, tok, out, lora, manifest, ws, base_id, run_id)


def save_trained(net, tok, out: Path, lora: bool, manifest: dict, ws: Workspace, base_id: str, run_id: str) -> Path:
    """Write the adapter (LoRA) or the whole model with its tokenizer, fmkit.json, and the registry entries."""
    from ..models.io import save_model

    if lora:
        net.save_pretrained(out)
        tok.save_pretrained(out)
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            tok.save_pretrained(tmp)
            save_model(net, out, tmp, {})
    manifest["id"] = ws.add_artifact(manifest["kind"], out, manifest, parents=[base_id])
    write_manifest(out, manifest)
    ws.finish_run(run_id, "finished", outputs=[manifest["id"]])
    return out


def parent_name(ref) -> str:
    """How fmkit.json names a parent so that `resolve` finds it again: an absolute folder, or the reference."""
    return str(ref.path.resolve()) if ref.path is not None else ref.spec


def merge(adapter: str | Path, out: str | Path, base: str | Path | None = None) -> Path:
    """Fold a LoRA adapter into its base model (the one it names, or `base`) and save a plain model folder."""
    from ..models.io import save_model
    from ..models.reference import resolve

    ref = resolve(adapter, base)
    if ref.kind != "adapter":
        raise FmkitError(f"{ref.spec} is not an adapter folder (no adapter_config.json); nothing to merge")
    merged = ref.load(merge=True)
    save_model(merged, out, None, {"kind": "model", "method": "merged lora", "adapter": str(ref.path.resolve()),
                                   "parent_model": parent_name(ref.base), "lineage": ref.lineage()})
    ref.tokenizer().save_pretrained(out)
    return Path(out)
