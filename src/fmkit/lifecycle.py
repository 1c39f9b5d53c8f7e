"""`fmkit quickstart`: a tiny foundation model end to end on the local Python standard library."""
from __future__ import annotations

import shutil
import time
from importlib import resources
from pathlib import Path

from rich.table import Table

from .data.curate import curate
from .data.dataset import dataset_manifest
from .models.generate import Generator
from .plots import loss_curve
from .progress import report as console
from .tokenize.pack import pack
from .tokenize.tokenizer import train_tokenizer
from .train.metrics import read_metrics
from .train.pretrain import pretrain
from .workspace import Workspace

PROMPTS = ["def ", "import os\n\n\nclass ", '"""Return the']


def quickstart(workspace: str | Path | None = None, steps: int | None = None, vocab_size: int = 4096) -> Path:
    """Build a tiny foundation model end to end on the local Python standard library (a few minutes on a CPU).

    Curates the stdlib, trains a tokenizer, packs token shards (a fixed set of stdlib modules held out for
    validation), pre-trains a small Llama-style decoder, reports validation loss / perplexity / bits-per-byte,
    prints samples, saves a loss-curve PNG and lists every artifact. Re-running after Ctrl-C resumes from the last
    checkpoint. Returns the model folder.

    Args:
        workspace: Workspace folder: artifacts and the registry (default $FMKIT_WORKSPACE or ./fmkit-workspace).
        steps: Training steps (default: the tiny recipe's 500).
        vocab_size: Tokenizer vocabulary size.
    """
    ws = Workspace(workspace)
    started = time.time()
    console.rule("[bold]fmkit quickstart[/]: a tiny decoder on the Python standard library")
    console.print("1/5 curating stdlib sources (held-out modules excluded): filters, PII redaction, dedup")
    with resources.as_file(resources.files("fmkit") / "recipes" / "stdlib-curate.yaml") as path:
        dataset = curate(path, {"workspace": str(ws.root), "out": str(ws.path("datasets", "stdlib"))})
    _print_curation(dataset)
    console.print("2/5 training a byte-level BPE tokenizer on the curated dataset")
    tok = train_tokenizer(str(dataset), ws.path("tokenizers", "stdlib"), vocab_size=vocab_size,
                          max_bytes=4_000_000, workspace=ws.root)
    console.print("3/5 packing token shards (train, and held-out modules for validation)")
    train_shards = pack(str(dataset), tok, ws.path("shards", "stdlib-train"), workspace=ws.root)
    val_shards = pack("stdlib:val", tok, ws.path("shards", "stdlib-val"), workspace=ws.root)
    out = ws.path("models", "quickstart")
    resume = (out / "checkpoints").is_dir() and not (out / "model.safetensors").exists()
    if not resume and out.exists():
        shutil.rmtree(out)  # a finished earlier quickstart: start over rather than mix two runs
    recipe = resources.files("fmkit") / "recipes" / "tiny.yaml"
    overrides = {"data.shards": str(train_shards), "data.val_shards": str(val_shards), "out": str(out),
                 "workspace": str(ws.root)}
    if steps:
        overrides["train.steps"] = steps
    console.print(f"4/5 pre-training ({'resuming' if resume else 'recipe tiny.yaml'}); Ctrl-C saves a checkpoint "
                  "and re-running quickstart continues from it")
    with resources.as_file(recipe) as path:
        model_dir = pretrain(path, overrides, resume=resume)
    history = read_metrics(model_dir)
    evals = [r for r in history if "val_loss" in r]
    table = Table(title="validation on held-out stdlib modules")
    for col in ("step", "loss (nats)", "perplexity", "bits/byte"):
        table.add_column(col, justify="right")
    for r in evals:
        table.add_row(str(r["step"]), f"{r['val_loss']:.3f}", f"{r['val_ppl']:.1f}", f"{r['val_bpb']:.3f}")
    console.print(table)
    png = loss_curve(history, model_dir / "loss_curve.png", "fmkit quickstart: stdlib pre-training")
    console.print("5/5 samples (temperature 0.8, top-k 50):")
    gen = Generator(model_dir)
    for prompt, c in zip(PROMPTS, gen(PROMPTS, max_new_tokens=60, temperature=0.8, top_k=50, seed=0)):
        console.print(f"[dim]{'-' * 60}[/]\n[bold]{prompt}[/]{c.text}", markup=True, highlight=False)
    console.print(f"[dim]{'-' * 60}[/]")
    arts = Table(title="artifacts")
    arts.add_column("what")
    arts.add_column("where")
    for what, where in [("workspace + registry", ws.db_path), ("curated dataset", dataset),
                        ("curation report", "fmkit curate report " + str(dataset)), ("tokenizer", tok), ("train shards", train_shards),
                        ("validation shards", val_shards), ("model (HF format)", model_dir),
                        ("checkpoints", model_dir / "checkpoints"), ("metrics", model_dir / "metrics.jsonl"),
                        ("tensorboard", model_dir / "tensorboard"), ("loss curve", png)]:
        arts.add_row(what, str(where))
    console.print(arts)
    console.print(f"done in {time.time() - started:.0f} s. Try: fmkit generate {model_dir} --prompt 'def '")
    return model_dir


def _print_curation(dataset: Path) -> None:
    m = dataset_manifest(dataset)
    for s in m["sources"]:
        top = ", ".join(f"{k} {v}" for k, v in list(s["rejected_by"].items())[:4])
        console.print(f"   {s['documents_in']:,} documents in, {s['kept']:,} kept, {s['rejected']:,} rejected"
                      + (f" ({top})" if top else ""), highlight=False)
