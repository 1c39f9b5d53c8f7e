"""fmkit's training loop vs a plain transformers training loop on the same model, data shape and optimizer.

    python bench/pretrain_throughput.py [--steps 8]

Model: LlamaForCausalLM, hidden 256, 4 layers, 4 heads, intermediate 688, vocab 50304, tied embeddings; batch
8 x 256 tokens; AdamW. Each contender runs in its own process. The plain loop runs as a user would write it
(model(input_ids, labels).loss.backward(); optimizer.step()), with the default allocator; fmkit runs its real
`train()` with default settings (allocator tuning on, precision auto). MFU is against the dense-matmul peak this
script measures for the dtype each contender computes in.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

BATCH, SEQ = 8, 256


def plain(steps: int, precision: str) -> dict:
    import torch

    from common import reference_model

    model = reference_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)

    def step():
        x = torch.randint(0, 50304, (BATCH, SEQ), generator=gen)
        with ctx:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return {"tokens_per_s": steps * BATCH * SEQ / (time.perf_counter() - start)}


class RandomBatches:
    """Random token windows, indexed by step like fmkit's PretrainBatches (one process, no accumulation)."""

    batch_size = global_batch = BATCH
    grad_accum, rank, world = 1, 0, 1
    tokens_per_step = BATCH * SEQ

    def get(self, step: int, micro: int) -> dict:
        import torch

        g = torch.Generator().manual_seed(step)
        return {"tokens": torch.randint(0, 50304, (BATCH, SEQ + 1), generator=g), "seed": step}


def fmkit(steps: int, precision: str) -> dict:
    import tempfile

    from fmkit.config import TrainConfig
    from fmkit.train.loop import train
    from fmkit.train.objectives import causal_lm

    from common import reference_model

    cfg = TrainConfig(steps=steps + 2, batch_size=BATCH, seq_len=SEQ, lr=1e-4, warmup_steps=0, log_every=1,
                      save_every=0, precision=precision, weight_decay=0.0, grad_clip=0.0)
    with tempfile.TemporaryDirectory() as out:
        result = train(reference_model(), causal_lm, RandomBatches(), cfg, out)
    timed = [r for r in result.history if r["step"] > 2]
    seconds = timed[-1]["elapsed_s"] - result.history[1]["elapsed_s"]
    return {"tokens_per_s": len(timed) * BATCH * SEQ / seconds, "precision": result.precision}


def main() -> None:
    import torch

    from common import REFERENCE, machine, reference_model, run_isolated
    from fmkit.runtime import fast_bf16, matmul_tflops

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, precision = args.worker
        print(json.dumps((plain if kind == "plain" else fmkit)(args.steps, precision)))
        return
    peak = {"fp32": matmul_tflops(torch.float32, "cpu", 1024), "bf16": matmul_tflops(torch.bfloat16, "cpu", 512)}
    bf16_fast = fast_bf16("cpu")
    from fmkit.models.build import count_parameters
    from fmkit.train.metrics import flops_per_token

    flops_tok = flops_per_token(count_parameters(reference_model()), REFERENCE["num_hidden_layers"],
                                REFERENCE["hidden_size"], SEQ)
    print(f"machine: {machine()}")
    print(f"matmul peak: fp32 {peak['fp32'] * 1e3:.0f} GFLOP/s, bf16 {peak['bf16'] * 1e3:.0f} GFLOP/s")
    rows = [("transformers loop, fp32", "plain", "fp32")]
    if bf16_fast:
        rows.append(("transformers loop, bf16 autocast", "plain", "bf16"))
    rows.append(("fmkit train(), precision auto", "fmkit", "auto"))
    results = []
    for label, kind, precision in rows:
        r = run_isolated(__file__, "--steps", str(args.steps), "--worker", kind, precision)
        used = r.get("precision", precision)
        r["mfu"] = r["tokens_per_s"] * flops_tok / (peak[used] * 1e12)
        results.append((label + (f" ({used})" if kind == "fmkit" else ""), r))
    if not bf16_fast:
        print("bf16 autocast loop skipped: bf16 matmul is emulated on this CPU "
              f"({peak['bf16'] / peak['fp32']:.2f}x fp32), a step would take minutes")
    base = results[0][1]["tokens_per_s"]
    print(f"\n{'contender':48s} {'tokens/s':>10s} {'MFU':>7s} {'vs plain fp32':>14s}")
    for label, r in results:
        print(f"{label:48s} {r['tokens_per_s']:10.0f} {r['mfu']:7.1%} {r['tokens_per_s'] / base:13.2f}x")


if __name__ == "__main__":
    main()
