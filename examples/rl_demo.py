"""A reward model and online RL on tasks where success is measurable, with a tiny decoder, in a few minutes on 2 CPU
cores. No download: the tokenizer is trained on the local standard library, the model is a seeded random one.

1. `fmkit reward`: preference pairs whose chosen answer says "please" (otherwise drawn like the rejected one);
   pairwise accuracy on held-out pairs, with the exact sign test against a coin.
2. `fmkit rl --reward 'contains: the'`: the random start says " the" in 8 tokens about 3% of the time. The
   held-out reward is measured every few steps (same seeds each time), then compared answer by answer with the
   start by the exact sign test (McNemar's, for 0/1 rewards); the KL per answer is reported against --kl-max.

    python examples/rl_demo.py [--out DIR] [--steps 24] [--kl-max 6]
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import time
from pathlib import Path

import torch

import fmkit
from fmkit.evals.metrics import mcnemar
from fmkit.models.generate import Generator
from fmkit.models.io import load_tokenizer
from fmkit.workspace import write_manifest

WORDS = "alpha beta gamma delta river stone cloud paper green light table water".split()


def tiny_decoder(root: Path) -> Path:
    """A tokenizer (512 tokens) trained on the standard library and a seeded 2-layer Llama (hidden 64) using it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = root / "tiny"
    if (folder / "model.safetensors").is_file():
        return folder
    tok_dir = fmkit.train_tokenizer("stdlib:val", root / "tokenizer", vocab_size=512, sentinels=8, workspace=root)
    tok = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 vocab_size=len(tok), max_position_embeddings=128, tie_word_embeddings=True,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(folder)
    tok.save_pretrained(folder)
    write_manifest(folder, {"kind": "model"})
    return folder


def preferences(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        chosen, rejected = [rng.choice(WORDS) for _ in range(5)], [rng.choice(WORDS) for _ in range(6)]
        chosen.insert(rng.randrange(6), "please")
        rows.append({"prompt": f"Request {i}", "chosen": " ".join(chosen), "rejected": " ".join(rejected)})
    return rows


def reward_model(root: Path, model: Path, steps: int) -> None:
    (root / "prefs.jsonl").write_text("\n".join(map(json.dumps, preferences(192, 0))))
    (root / "prefs-held.jsonl").write_text("\n".join(map(json.dumps, preferences(64, 1))))
    started = time.time()
    out = fmkit.reward(model, root / "prefs.jsonl", root / "reward-model", val_data=root / "prefs-held.jsonl",
                       steps=steps, batch_size=8, lr=1e-3, workspace=root)
    held = json.loads((out / "fmkit.json").read_text())["heldout"]
    decided = held["wins"] + held["losses"]
    p = mcnemar([0] * decided, [1] * held["wins"] + [-1] * held["losses"])["p_value"]
    print(f"reward model: held-out pairwise accuracy {held['accuracy']:.3f} on {held['pairs']} pairs "
          f"({held['wins']} right, {held['losses']} wrong; sign test against chance p = {p:.2g}); "
          f"{steps} steps, {time.time() - started:.0f} s")


def rl_run(root: Path, model: Path, steps: int, kl_max: float) -> None:
    rows = [{"prompt": f"Task {i}:"} for i in range(64)]
    (root / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:48]))
    (root / "prompts-held.jsonl").write_text("\n".join(json.dumps(r) for r in rows[48:]))
    tok = load_tokenizer(model)
    held_prompts = [r["prompt"] for r in rows[48:]] * 8    # 8 answers to each of 16 held-out prompts

    def held_out(net) -> list[float]:
        gen = Generator.from_model(copy.deepcopy(net), tok, dtype="fp32")
        return [float(" the" in c.text) for c in gen(held_prompts, max_new_tokens=8, temperature=1.0, seed=7)]

    from fmkit.models.io import load_model

    start = held_out(load_model(model))
    curve = [(0, sum(start) / len(start), None)]
    train_log = {}

    def on_checkpoint(step, net, record):
        scores = held_out(net)
        curve.append((step, sum(scores) / len(scores), scores))

    started = time.time()
    out = fmkit.rl(model, "contains: the", root / "prompts.jsonl", root / "policy",
                   val_data=root / "prompts-held.jsonl", group=8, batch_size=4, max_new_tokens=8, steps=steps,
                   lr=1e-2, beta=0.01, kl_max=kl_max,
                   eval_samples=8, template="none", workspace=root, save_every=4, log_every=1,
                   on_log=lambda r: train_log.__setitem__(r["step"], r), on_checkpoint=on_checkpoint)
    seconds = time.time() - started
    print("\nstep  train reward  train KL/answer  held-out reward")
    for step, mean, _ in curve:
        r = train_log.get(step, {})
        print(f"{step:4d}  {r.get('reward', float('nan')):12.3f}  {r.get('kl', float('nan')):15.2f}  {mean:15.3f}")
    final = curve[-1][2]
    test = mcnemar(start, final)
    print(f"held-out reward {curve[0][1]:.3f} -> {curve[-1][1]:.3f} over {len(final)} answers: {test['b_only']} "
          f"answers better, {test['a_only']} worse, exact sign test p = {test['p_value']:.2g}")
    held = json.loads((out / "fmkit.json").read_text())["heldout"]
    print(f"fmkit.json: reward {held['reward_before']:.3f} -> {held['reward_after']:.3f}, KL {held['kl_after']:.2f} "
          f"nats per answer (bound --kl-max {kl_max}); {steps} steps, {seconds:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("fmkit-workspace/rl-demo"))
    ap.add_argument("--steps", type=int, default=24, help="RL steps")
    ap.add_argument("--reward-steps", type=int, default=40, help="reward model steps")
    ap.add_argument("--kl-max", type=float, default=6.0)
    args = ap.parse_args()
    torch.set_num_threads(1)   # a model this small runs faster on one thread than on two shared cores
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("reward-model", "policy"):   # a rerun starts afresh
        shutil.rmtree(args.out / name, ignore_errors=True)
    model = tiny_decoder(args.out)
    reward_model(args.out, model, args.reward_steps)
    rl_run(args.out, model, args.steps, args.kl_max)


if __name__ == "__main__":
    main()
