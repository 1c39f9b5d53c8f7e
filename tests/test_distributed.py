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
