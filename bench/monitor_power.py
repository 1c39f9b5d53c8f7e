"""Detection power of `fmkit monitor` against samples per prompt, and its false-alarm rate, on a real `fmkit serve`.

A tiny Llama (tests/monitor_swaps.py) is served from a --models-dir; each trial is a fresh monitor (its own seed)
that takes its baseline runs on that model, then the model is swapped: (a) the same weights after one AdamW step
(lr 1e-4), (b) the same folder served in bf16 instead of fp32, (c) a rank-4 LoRA adapter on it (B ~ N(0, 0.05^2)),
and, to show where text alone gains power, (c') a larger one (B ~ N(0, 0.5^2)). A trial detects the swap when a
run raises an alert within --runs runs after it. Text-only monitors (logprobs=False: the MMD and McNemar tests
alone) are measured at each samples-per-prompt; full monitors (log-probabilities too) at the smallest. The
false-alarm rate is the share of unchanged-model trials of --steady-runs runs at temperature 0.7 that alerted.

    python bench/monitor_power.py [--trials 10] [--samples 2 8 32] [--runs 3] [--steady-trials 4]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from monitor_swaps import lora, one_step, swap, tiny_model, write_suite  # noqa: E402

import fmkit  # noqa: E402

SETTINGS = dict(temperature=0.7, max_tokens=16, baseline_runs=4, alpha=0.05, horizon=100, permutations=4999,
                endpoint="completions")


def trial(world: dict, name: str, change: str | None, runs: int, seed: int, **kw) -> tuple[int, list[dict]]:
    """Baseline runs on the original model, then `runs` runs on the changed one; (run that alerted or 0, results)."""
    ws = world["ws"]
    fmkit.monitor_init(name, "openai:tiny", str(world["suite"]), base_url=world["url"], seed=seed, workspace=ws,
                       **{**SETTINGS, **kw})
    for _ in range(SETTINGS["baseline_runs"]):
        fmkit.monitor_run(name, workspace=ws)
    url = world["bf16"] if change == "bf16" else world["url"]
    if change not in (None, "bf16"):
        swap(world["models"], "tiny", world[change], [world["url"]])
    try:
        results = []
        for n in range(1, runs + 1):
            with contextlib.redirect_stdout(io.StringIO()):   # the alerts' own text; the table is the output here
                results.append(fmkit.monitor_run(name, base_url=url, workspace=ws))
            if results[-1]["alert"]:
                return n, results
        return 0, results
    finally:
        if change not in (None, "bf16"):
            swap(world["models"], "tiny", world["orig"], [world["url"]])


def power(world: dict, change: str, samples: int, trials: int, runs: int, logprobs: bool) -> str:
    """A table row: trials detected, mean runs to the alert, and how often the first run after the swap alone had
    p <= alpha in the main test (logprob, or mmd for text only)."""
    found = [trial(world, f"{change}-{samples}-{logprobs}-{t}", change, runs, t, samples=samples,
                   logprobs=logprobs) for t in range(trials)]
    hits = [n for n, _ in found if n]
    main_test = "logprob" if logprobs else "mmd"
    first = sum(r[0]["tests"][main_test]["p_value"] <= SETTINGS["alpha"] for _, r in found)
    mean = f"{sum(hits) / len(hits):.1f}" if hits else "-"
    return f"| {change} | {'logprob + text' if logprobs else 'text only'} | {samples} | " \
           f"{len(hits)}/{trials} = {len(hits) / trials:.2f} | {mean} | {main_test} {first / trials:.2f} |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--samples", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--runs", type=int, default=3, help="runs after the swap within which an alert counts")
    ap.add_argument("--steady-trials", type=int, default=4)
    ap.add_argument("--steady-runs", type=int, default=50)
    args = ap.parse_args()
    start = time.time()
    root = Path(tempfile.mkdtemp(prefix="fmkit-monitor-bench-"))
    try:
        from fmkit.tokenize.tokenizer import train_tokenizer

        tok = train_tokenizer("stdlib:val", root / "tok", vocab_size=512, sentinels=8, workspace=root / "ws")
        orig = tiny_model(tok, root / "orig")
        models = root / "models"
        models.mkdir()
        shutil.copytree(orig, models / "tiny", copy_function=shutil.copy)
        world = {"ws": root / "ws", "orig": orig, "models": models, "suite": write_suite(root / "canaries.jsonl"),
                 "step": one_step(orig, root / "step"), "lora": lora(orig, root / "lora"),
                 "lora-0.5": lora(orig, root / "lora-0.5", std=0.5)}
        with fmkit.Server(models_dir=str(models), dtype="fp32") as url, \
                fmkit.Server(models_dir=str(models), dtype="bf16") as bf16_url:
            world.update(url=url, bf16=bf16_url)
            print(f"tiny Llama (hidden 64, 2 layers), {len(world['suite'].read_text().splitlines())} canaries, "
                  f"{SETTINGS['baseline_runs']} baseline runs, {SETTINGS['permutations']} permutations, alpha "
                  f"{SETTINGS['alpha']} over {SETTINGS['horizon']} runs; detected = an alert within {args.runs} "
                  f"runs of the swap; {args.trials} trials per row\n")
            print("| swap | tests | samples per prompt | detected | mean runs to alert | first run p <= alpha |\n"
                  "|---|---|---|---|---|---|")
            for change in ("step", "bf16", "lora", "lora-0.5"):
                print(power(world, change, min(args.samples), args.trials, args.runs, True), flush=True)
                for k in args.samples:
                    print(power(world, change, k, args.trials, args.runs, False), flush=True)
            alarms, calls, small = 0, 0, {t: 0 for t in ("logprob", "mmd", "mcnemar")}
            for t in range(args.steady_trials):
                n, results = trial(world, f"steady-{t}", None, args.steady_runs, 1000 + t, samples=8)
                alarms += bool(n)
                calls += len(results)
                for r in results:
                    for test, v in r["tests"].items():
                        small[test] += v["p_value"] is not None and v["p_value"] <= SETTINGS["alpha"]
            print(f"\nunchanged model, temperature 0.7, 8 samples per prompt: {alarms} of {args.steady_trials} "
                  f"trials of {args.steady_runs} runs alerted ({calls} tested runs); runs with p <= "
                  f"{SETTINGS['alpha']}: " + ", ".join(f"{t} {c}/{calls}" for t, c in small.items()))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
