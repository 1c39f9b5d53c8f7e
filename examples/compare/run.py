"""A worked comparison of three candidates, offline on a CPU in about a minute: a small base model, the same model
fine-tuned to answer a question, and that fine-tune served over HTTP by `fmkit serve` (an OpenAI-compatible API
with a price per token, standing in for a hosted model).

    python examples/compare/run.py [WORKDIR]

It writes WORKDIR/suite.jsonl (120 rows), WORKDIR/candidates.yaml, and the compare run in
WORKDIR/ws/compares/candidates/ (results.json, samples.jsonl, report.html).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

import fmkit


def base_model(root: Path) -> Path:
    """A 2-layer Llama (hidden 64) with a byte-level BPE tokenizer trained on the local Python standard library."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fmkit.models.io import load_tokenizer
    from fmkit.workspace import write_manifest

    tok_dir = fmkit.train_tokenizer("stdlib:val", root / "tokenizer", vocab_size=512, workspace=root / "ws")
    tok = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      vocab_size=len(tok), max_position_embeddings=128, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    out = root / "base"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    write_manifest(out, {"kind": "model"})
    return out


def main(root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    base = base_model(root)
    train = root / "train.jsonl"
    train.write_text("\n".join(json.dumps({"prompt": f"Item {i}: colour?", "completion": " blue."})
                               for i in range(40)))
    tuned = fmkit.finetune(base, train, out=root / "tuned", steps=25, lr=3e-3, batch_size=8, template="none",
                           workspace=root / "ws")
    rows = [{"id": f"item-{i}", "input": f"Item {1000 + i}: colour?", "reference": "blue",
             "assert": [{"contains": "blue"}, {"max_tokens": 8}, {"python": "len(output.split()) <= 3"}]}
            for i in range(120)]
    (root / "suite.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with fmkit.Server(models=[str(tuned)], dtype="fp32") as url:
        (root / "candidates.yaml").write_text(yaml.safe_dump({
            "defaults": {"max_tokens": 6, "stop": ["."], "chat": False},
            "candidates": [{"name": "base", "model": str(base)},
                           {"name": "tuned", "model": str(tuned)},
                           {"name": "served", "model": "openai:tuned", "base_url": url, "price": [0.15, 0.60]}]},
            sort_keys=False))
        return fmkit.compare(str(root / "candidates.yaml"), [str(root / "suite.jsonl")],
                             require=["latency_p95_ms<1500"], prefer="cost", tolerance=0.02, workspace=root / "ws")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "compare-example"))
