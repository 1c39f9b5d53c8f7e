"""fmkit generation vs transformers `generate` on the same model: new tokens/s at batch 1 and 8, 128 new tokens.

    python bench/generate_throughput.py [--new-tokens 128] [--repeats 3]

Model: LlamaForCausalLM, hidden 256, 4 layers, 4 heads, vocab 50304, tied embeddings, random weights (speed does
not depend on them). Greedy decoding, EOS disabled so every run makes exactly --new-tokens tokens, 16-token
prompts. Both run in one process on the same model object, fp32; fmkit's bf16 is shown too when this CPU has
native bf16. Before timing, the script checks that both produce the same tokens.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    import torch

    from common import machine, reference_model
    from fmkit.generate import Generator
    from fmkit.runtime import tune_allocator
    from fmkit.train.precision import fast_bf16

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tune_allocator()
    model = reference_model().eval()
    dtypes = ["fp32"] + (["bf16"] if fast_bf16("cpu") else [])
    ours = {d: Generator.from_model(model, dtype=d) for d in dtypes}
    print(f"machine: {machine()}")
    print(f"{'batch':>5s} {'contender':34s} {'new tok/s':>10s} {'vs transformers':>16s}")
    for batch in (1, 8):
        prompt = torch.randint(1, 50304, (batch, 16), generator=torch.Generator().manual_seed(batch))

        def hf():
            with torch.inference_mode():
                return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                                      min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

        def fm(dtype):
            return ours[dtype].generate_ids(prompt.tolist(), args.new_tokens, temperature=0.0, eos=None)

        ref = hf()[:, 16:].tolist()
        got = [t for t, _ in fm("fp32")]
        agree = sum(a == b for r, g in zip(ref, got) for a, b in zip(r, g)) / (batch * args.new_tokens)
        rates = {}
        for name, fn in [("transformers generate (fp32)", hf)] + [(f"fmkit generate ({d})", lambda d=d: fm(d))
                                                                  for d in dtypes]:
            fn()
            best = min(_timed(fn) for _ in range(args.repeats))
            rates[name] = batch * args.new_tokens / best
        base = rates["transformers generate (fp32)"]
        for name, rate in rates.items():
            print(f"{batch:5d} {name:34s} {rate:10.0f} {rate / base:15.2f}x")
        print(f"      greedy tokens identical to transformers: {agree:.1%}")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
