"""fmkit LoRA fine-tuning vs peft + transformers.Trainer: same model, data and settings, training tokens/s.

Model: a Llama-style decoder (hidden 256, 4 layers, 4 heads, intermediate 688, tied embeddings) with an 8,192-token
BPE tokenizer trained on the standard library; data: 512 chat examples made from held-out stdlib docstrings
(user: the docstring, assistant: the function's signature) in fmkit's chat format on both sides, loss on assistant
tokens only; LoRA r=8, alpha=16 on q/k/v/o, AdamW, lr 2e-4, batch 8, fp32, 40 steps after 5 warm-up steps. Each
side runs in a fresh process; tokens/s counts all (unpadded) tokens of the examples processed per second. The
Trainer pads each batch to its longest example (its default collation); fmkit packs the same examples into rows
(same loss, no padding).

    python bench/lora_throughput.py [--steps 40]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from common import run_code

HERE = Path(__file__).parent


def make_assets(folder: Path) -> tuple[Path, Path]:
    import ast

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fmkit.evals.stdlib_tasks import stdlib_functions
    from fmkit.tokenize.tokenizer import train_tokenizer
    from fmkit.models.io import load_tokenizer

    tok_dir = train_tokenizer("stdlib:train", folder / "tok", vocab_size=8192, max_bytes=4_000_000,
                              workspace=folder / "ws")
    tok = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=688,
                      vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model_dir = folder / "model"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = []
    for _, node in stdlib_functions("all"):
        if isinstance(node, ast.FunctionDef) and ast.get_docstring(node):
            sig = f"def {node.name}({ast.unparse(node.args)}):"
            rows.append({"messages": [{"role": "user", "content": ast.get_docstring(node)[:600]},
                                      {"role": "assistant", "content": sig}]})
            if len(rows) == 512:
                break
    data = folder / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return model_dir, data


FMKIT = """
import json, sys, time
from fmkit.adapt.finetune import finetune
model, data, out, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
finetune(model, data, out + "/warm", lora=True, steps=5, batch_size=8, lr=2e-4, max_len=512, workspace=out + "/ws",
         template="fmkit")
# one checkpoint, at the end (the Trainer side saves none): mid-run checkpoints are a resumability cost
res = finetune(model, data, out + "/run", lora=True, steps=steps, batch_size=8, lr=2e-4, max_len=512,
               workspace=out + "/ws", log_every=1, save_every=steps, template="fmkit")
hist = [json.loads(l) for l in open(res / "metrics.jsonl")]
# the training loop's own clock (first step to last, final checkpoint included), like Trainer.train() on the
# other side; loading the model and tokenizing the data are outside both
# mean training loss over the run, the figure Trainer.train() reports
print(json.dumps({"seconds": hist[-1]["elapsed_s"], "tokens": hist[-1]["tokens_seen"],
                  "loss": sum(h["loss"] for h in hist) / len(hist)}))
"""

PEER = """
import json, sys, time, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
from fmkit.adapt.chat_template import encode_chat
model_dir, data, out, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(model_dir)
rows = []
for line in open(data):
    ids, mask = encode_chat(tok, json.loads(line)["messages"])
    rows.append({"input_ids": ids[:512], "labels": [t if m else -100 for t, m in zip(ids, mask)][:512]})
def collate(batch):
    w = max(len(r["input_ids"]) for r in batch)
    ids = torch.full((len(batch), w), tok.pad_token_id); lab = torch.full((len(batch), w), -100)
    att = torch.zeros((len(batch), w), dtype=torch.long)
    for i, r in enumerate(batch):
        n = len(r["input_ids"]); ids[i, :n] = torch.tensor(r["input_ids"]); lab[i, :n] = torch.tensor(r["labels"]); att[i, :n] = 1
    return {"input_ids": ids, "labels": lab, "attention_mask": att}
def run(n, where):
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=where, max_steps=n, per_device_train_batch_size=8, learning_rate=2e-4,
                             warmup_steps=min(10, n // 10), weight_decay=0.0, logging_steps=max(1, n),
                             save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                             disable_tqdm=True, seed=0)
    tr = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    t = time.perf_counter(); out = tr.train(); return time.perf_counter() - t, out.training_loss
run(5, out + "/warm")
seconds, loss = run(steps, out + "/run")
# the Trainer samples with a seeded random sampler; its tokens per step average the same as ours over the data
mean_len = sum(len(r["input_ids"]) for r in rows) / len(rows)
print(json.dumps({"seconds": seconds, "tokens": round(steps * 8 * mean_len), "loss": loss}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, data = make_assets(tmp)
        print(f"model {model}; {sum(1 for _ in open(data))} examples; LoRA r=8 on q/k/v/o; batch 8; "
              f"{args.steps} steps; {os.cpu_count()} cores")
        peer = run_code(PEER, str(model), str(data), str(tmp / "peer"), str(args.steps), name="peft + Trainer run")
        ours = run_code(FMKIT, str(model), str(data), str(tmp / "fmkit"), str(args.steps), name="fmkit run")
        print(f"\n{'':26} {'seconds':>8} {'tokens/s':>9} {'mean loss':>11}")
        for name, r in (("peft + transformers.Trainer", peer), ("fmkit finetune --lora", ours)):
            print(f"{name:26} {r['seconds']:8.1f} {r['tokens'] / r['seconds']:9.0f} {r['loss']:11.3f}")
        print(f"\nspeed-up: {(ours['tokens'] / ours['seconds']) / (peer['tokens'] / peer['seconds']):.2f}x")


if __name__ == "__main__":
    main()
