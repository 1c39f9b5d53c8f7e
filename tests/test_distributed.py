"""Two processes under torchrun (gloo, CPU) follow the same loss trajectory as one process with the same batch."""
import os
import subprocess
import sys

import pytest

from fmkit.train.metrics import read_metrics
from fmkit.train.pretrain import pretrain

from conftest import tiny_overrides


def _args(overrides: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in overrides.items()]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, shards_dir, mode):
    common = {"train.steps": 5, "train.eval_every": 5, "train.save_every": 5}
    single = pretrain(None, tiny_overrides(shards_dir, tmp_path / "one", **common, **{"train.batch_size": 4}))
    over = tiny_overrides(shards_dir, tmp_path / "two", **common,
                          **{"train.batch_size": 2, "train.parallel": mode})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           "--standalone", "-m", "fmkit", "pretrain", *_args(over)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = [r["loss"] for r in read_metrics(single) if "loss" in r]
    two = [r["loss"] for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert len(one) == len(two) == 5
    assert one == pytest.approx(two, rel=1e-4, abs=1e-4)
    assert (tmp_path / "two" / "model.safetensors").exists()


def test_sft_ranks_train_on_disjoint_shares_of_the_one_process_batch(tmp_path, tokenizer_dir):
    import json

    from conftest import save_tiny_llama
    from sft_two_ranks import main

    from fmkit.models.io import load_tokenizer
    from fmkit.workspace import Workspace

    tok = load_tokenizer(tokenizer_dir)
    base = save_tiny_llama(tokenizer_dir, tmp_path / "base", 128, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}" + "!" * (i % 4)}]} for i in range(24)]
    (tmp_path / "chat.jsonl").write_text("\n".join(map(json.dumps, rows)))
    common = {"model": str(base), "data": str(tmp_path / "chat.jsonl"), "steps": 4, "lr": 3e-3, "log_every": 1,
              "template": "fmkit"}
    main({**common, "out": str(tmp_path / "one"), "batch_size": 4, "workspace": str(tmp_path / "ws1")})
    two = {**common, "out": str(tmp_path / "two"), "batch_size": 2, "workspace": str(tmp_path / "ws2")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                           os.path.join(os.path.dirname(__file__), "sft_two_ranks.py"), json.dumps(two)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def seen(out, rank):
        return json.loads((tmp_path / out / f"seen-rank{rank}.json").read_text())

    for step, whole in seen("one", 0).items():
        r0, r1 = seen("two", 0)[step], seen("two", 1)[step]
        assert len(r0) == len(r1) == 2 and not set(r0) & set(r1)
        assert sorted(r0 + r1) == sorted(whole)
    one = [r["loss"] for r in read_metrics(tmp_path / "one") if "loss" in r]
    both = [r["loss"] for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert len(one) == 4 and one == pytest.approx(both, rel=1e-4, abs=1e-4)
    (run,) = Workspace(tmp_path / "ws2").runs()   # one run, recorded and finished by rank 0
    assert run["status"] == "finished" and (tmp_path / "two" / "fmkit.json").exists()
