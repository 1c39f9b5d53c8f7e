"""What both benchmarks share: the issue's reference model and a matmul peak measured on this machine."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

REFERENCE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=688, vocab_size=50304, tie_word_embeddings=True, max_position_embeddings=512)


def reference_model(seed: int = 0):
    """LlamaForCausalLM at the reference size (hidden 256, 4 layers, 4 heads, 50304 vocab, tied embeddings)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**REFERENCE)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def run_isolated(script: str, *args: str, env: dict | None = None) -> dict:
    """Run one measurement in a fresh process (allocator state and settings never leak between contenders); its
    last line of output is the JSON result."""
    return _last_json([sys.executable, script, *args], f"{script} {' '.join(args)}", env)


def run_code(code: str, *args: str, name: str = "the measured program", env: dict | None = None) -> dict:
    """`run_isolated` for a program given as text, with FMKIT_QUIET=1 (no progress bars in what is parsed)."""
    return _last_json([sys.executable, "-c", code, *args], name, {"FMKIT_QUIET": "1", **(env or {})})


def _last_json(argv: list[str], name: str, env: dict | None) -> dict:
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU {cap}"
