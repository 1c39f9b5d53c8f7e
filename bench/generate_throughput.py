"""fmkit generation vs transformers `generate` on the same model: new tokens/s at batch 1 and 8, 128 new tokens.

    python bench/generate_throughput.py [--new-tokens 128] [--repeats 3] [--no-native]

Model: LlamaForCausalLM, hidden 256, 4 layers, 4 heads, vocab 50304, tied embeddings, random weights (speed does
not depend on them). Greedy decoding, EOS disabled so every run makes exactly --new-tokens tokens, 16-token
prompts. Both run in one process on the same weights, fp32; where this CPU has native bf16, both are also run in
bf16 (transformers on a bf16 copy of the model). Ratios are against transformers in fp32, the issue's reference,
and for bf16 also against transformers in bf16. Before timing, the script checks how many greedy tokens agree.
--no-native keeps fmkit's single-token steps in PyTorch (FMKIT_NATIVE=0), to see what the compiled step adds.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-native", action="store_true", help="fmkit without its compiled decoding step")
    args = ap.parse_args()
    if args.no_native:
        os.environ["FMKIT_NATIVE"] = "0"

    import torch

    from common import machine, reference_model
    from fmkit.models.generate import Generator, resolve_dtype
    from fmkit.models import native
    from fmkit.runtime import tune_allocator
    from fmkit.runtime import fast_bf16

    tune_allocator()
    model = reference_model().eval()
    dtypes = ["fp32"] + (["bf16"] if fast_bf16("cpu") else [])
    ours = {d: Generator.from_model(model, dtype=d) for d in dtypes}
    theirs = {"fp32": model}
    if "bf16" in dtypes:
        theirs["bf16"] = copy.deepcopy(model).to(torch.bfloat16)
    print(f"machine: {machine()}")
    step = "yes" if native.load() is not None else f"no ({native.why_not()})"
    print(f"fmkit's compiled decoding step: {step}; --dtype auto picks {resolve_dtype('auto')} here")
    print(f"{'batch':>5s} {'contender':34s} {'new tok/s':>10s} {'vs transformers':>16s}")
    for batch in (1, 8):
        prompt = torch.randint(1, 50304, (batch, 16), generator=torch.Generator().manual_seed(batch))

        def hf(dtype="fp32"):
            with torch.inference_mode():
                return theirs[dtype].generate(prompt, attention_mask=torch.ones_like(prompt),
                                              max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                              do_sample=False, pad_token_id=0)

        def fm(dtype):
            return ours[dtype].generate_ids(prompt.tolist(), args.new_tokens, temperature=0.0, eos=None)

        agree = {}
        for d in dtypes:
            ref = hf(d)[:, 16:].tolist()
            got = [t for t, _ in fm(d)]
            agree[d] = sum(a == b for r, g in zip(ref, got) for a, b in zip(r, g)) / (batch * args.new_tokens)
        rates = {}
        for d in dtypes:
            for name, fn in [(f"transformers generate ({d})", lambda d=d: hf(d)),
                             (f"fmkit generate ({d})", lambda d=d: fm(d))]:
                fn()
                best = min(_timed(fn) for _ in range(args.repeats))
                rates[name] = batch * args.new_tokens / best
        base = rates["transformers generate (fp32)"]
        for name, rate in rates.items():
            extra = ""
            if name == "fmkit generate (bf16)":
                extra = f"   ({rate / rates['transformers generate (bf16)']:.2f}x transformers in the same dtype)"
            print(f"{batch:5d} {name:34s} {rate:10.0f} {rate / base:15.2f}x{extra}")
        for d in dtypes:
            print(f"      greedy tokens identical to transformers, {d}: {agree[d]:.1%}")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
