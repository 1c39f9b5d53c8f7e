"""What the adaptation verbs (finetune, dpo, classify) share around the one loop: their training defaults, LoRA
wiring, the process layout under torchrun, the registry run record, and saving the trained model or adapter."""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch

from ..config import TrainConfig
from ..errors import FmkitError
from ..train import parallel
from ..workspace import Workspace, default_root, write_manifest


def train_config(steps: int, batch_size: int, grad_accum: int, seq_len: int, lr: float, seed: int,
                 weight_decay: float = 0.0, validate: bool = False, **train_kw) -> TrainConfig:
    """The adaptation verbs' loop settings: short warmup, a checkpoint halfway and at the end (the newest kept),
    about 20 log lines, 4 validations when there is held-out data, fp32; `train_kw` overrides any TrainConfig field."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(train_kw) - known)
    if unknown:
        raise FmkitError(f"unknown training setting '{unknown[0]}'; the settings are: {', '.join(sorted(known))}")
    cfg = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lr=lr,
                      warmup_steps=min(10, steps // 10), weight_decay=weight_decay,
                      eval_every=max(1, steps // 4) if validate else steps + 1, save_every=max(1, steps // 2),
                      keep_last=1, log_every=max(1, steps // 20), seed=seed, precision="fp32")
    return dataclasses.replace(cfg, **train_kw).check()


def processes(device: str = "auto", mode: str = "ddp") -> parallel.Dist:
    """This process's place among the ones torchrun started (rank 0 of 1 without torchrun)."""
    d = parallel.init(device)
    if d.world > 1 and mode != "ddp":
        # the verbs save the trained module itself, which FSDP would leave sharded across the ranks
        raise FmkitError(f"train.parallel={mode} is for pretrain; fine-tuning verbs run with train.parallel=ddp")
    return d


def lora_targets(model, wanted: list[str]) -> list[str]:
    """Check LoRA target module names against the model; the error lists the ones that exist."""
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    missing = [w for w in wanted if w not in linear]
    if missing:
        raise FmkitError(f"LoRA target module(s) {', '.join(missing)} not in this model; its linear layers are: "
                         f"{', '.join(linear)}")
    return wanted


def add_lora(net, targets: list[str], r: int, alpha: int, seed: int, task_type: str = "CAUSAL_LM"):
    """`net` wrapped by peft with LoRA adapters on the `targets` linear layers, their random init seeded so the
    same run gives the same adapter. For SEQ_CLS, peft also trains and saves the classification head in full."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise FmkitError("LoRA needs peft: pip install 'fmkit[adapt]'") from None
    lora_targets(net, targets)
    torch.manual_seed(seed)
    return get_peft_model(net, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                                          task_type=task_type))


def output_dir(out: str | Path | None, workspace: str | Path | None, name: str) -> Path:
    """`out`, or <workspace>/models/NAME: known on every rank without opening the registry."""
    return Path(out) if out else (Path(workspace) if workspace else default_root()) / "models" / name


@dataclasses.dataclass
class Run:
    """A registry run (rank 0) or a stand-in for it (other ranks, `ws` None)."""

    ws: Workspace | None
    id: str = ""


@contextlib.contextmanager
def run_record(d: parallel.Dist, workspace: str | Path | None, kind: str, config: dict, inputs: list[str]):
    """Record the run in the registry on rank 0; if the work inside raises, the run is marked failed with the
    error (`save_output` marks it finished)."""
    ws = Workspace(workspace) if d.main else None
    run = Run(ws, ws.start_run(kind, config, inputs) if ws else "")
    try:
        yield run
    except BaseException as e:
        if ws:
            ws.finish_run(run.id, "failed", error=f"{type(e).__name__}: {e}")
        raise


def save_output(net, tok, out: Path, manifest: dict, run: Run, parents: list[str]) -> Path:
    """Write the trained model or adapter with its tokenizer and `fmkit.json`, and record it (rank 0 only; the
    other ranks hold the same weights under DDP and write nothing)."""
    if run.ws is None:
        return out
    net.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    manifest = {**manifest, "run_id": run.id}
    manifest["id"] = run.ws.add_artifact(manifest["kind"], out, manifest, parents=parents)
    write_manifest(out, manifest)
    run.ws.finish_run(run.id, "finished", outputs=[manifest["id"]])
    return out


def parent_name(ref) -> str:
    """How fmkit.json names a parent so that `resolve` finds it again: an absolute folder, or the reference."""
    return str(ref.path.resolve()) if ref.path is not None else ref.spec
