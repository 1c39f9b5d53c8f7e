"""Training metrics: one JSON line per log step (metrics.jsonl) and TensorBoard scalars when installed."""
from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    def __init__(self, folder: Path, enabled: bool = True, resume_step: int = 0):
        self.path = folder / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # drop lines a resumed run is about to write again
            kept = [ln for ln in self.path.read_text().splitlines() if json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(folder / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:  # tensorboard is an extra: `pip install fmkit[tensorboard]`
            self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb:
            self.tb.close()


def read_metrics(folder: str | Path) -> list[dict]:
    path = Path(folder) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def flops_per_token(n_params: int, layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12·L·d·T for attention scores (PaLM, appendix B)."""
    return 6 * n_params + 12 * layers * hidden * seq_len


def lm_metrics(loss: float, bytes_per_token: float | None) -> dict:
    """Loss in nats -> perplexity and bits per byte (comparable across tokenizers)."""
    out = {"loss": loss, "ppl": math.exp(min(loss, 50))}
    if bytes_per_token:
        out["bpb"] = loss / math.log(2) / bytes_per_token
    return out
