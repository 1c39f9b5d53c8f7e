"""Every verb has --help, and user mistakes end in one line on stderr with exit code 2, never a traceback."""
import re
import subprocess
import sys

import pytest
import torch


def fmkit(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fmkit", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


@pytest.mark.parametrize("verb", [[], ["quickstart"], ["tokenizer", "train"], ["pack"], ["pretrain"],
                                  ["generate"], ["registry"]])
def test_help(verb):
    proc = fmkit(*verb, "--help")
    assert proc.returncode == 0 and "Usage" in proc.stdout


def _one_line_error(proc, pattern):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], proc.stderr


def test_user_mistakes_are_one_line(tmp_path, shards_dir):
    ws = ["--workspace", str(tmp_path)]
    _one_line_error(fmkit("tokenizer", "train", str(tmp_path / "missing"), *ws), "corpus path does not exist")
    (tmp_path / "empty").mkdir()
    _one_line_error(fmkit("tokenizer", "train", str(tmp_path / "empty"), *ws), "is empty")
    _one_line_error(fmkit("tokenizer", "train", "stdlib:val", "--vocab-size", "100", *ws), "too small")
    _one_line_error(fmkit("pretrain", f"--data.shards={shards_dir}", "--train.lrr=1"), "did you mean 'train.lr'")
    _one_line_error(fmkit("pretrain", f"--data.shards={shards_dir}", "--model.preset=tiny", "--train.seq_len=4096",
                          f"--workspace={tmp_path}", "--model.overrides.max_position_embeddings=64"),
                    "above the model's 64 positions")
    _one_line_error(fmkit("generate", str(tmp_path / "nope")), "no such folder")


def test_pickle_checkpoint_is_refused_on_the_command_line(tmp_path, tokenizer_dir):
    from fmkit.models.build import build_model, model_config

    model = build_model(model_config("decoder", "tiny", 512, 64, {"pad": 1, "eos": 0}))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((tokenizer_dir / f).read_bytes())
    _one_line_error(fmkit("generate", str(tmp_path)), "--trust-pickle")
    ok = fmkit("generate", str(tmp_path), "--trust-pickle", "--max-new-tokens", "3")
    assert ok.returncode == 0, ok.stderr


def test_pipeline_through_the_cli_records_lineage(tmp_path):
    ws = ["--workspace", str(tmp_path)]
    assert fmkit("tokenizer", "train", "stdlib:val", "--vocab-size", "400", "--out", str(tmp_path / "t"),
                 *ws).returncode == 0
    packed = fmkit("pack", "stdlib:val", str(tmp_path / "t"), "--out", str(tmp_path / "s"), *ws)
    assert packed.returncode == 0 and "tokens from 14 documents" in packed.stdout
    trained = fmkit("pretrain", f"--data.shards={tmp_path / 's'}", "--model.preset=tiny", "--train.steps=2",
                    "--train.seq_len=32", "--train.batch_size=2", f"--workspace={tmp_path}", "--name=cli")
    assert trained.returncode == 0, trained.stderr
    gen = fmkit("generate", str(tmp_path / "models" / "cli"), "-p", "def ", "--max-new-tokens", "5")
    assert gen.returncode == 0 and gen.stdout.startswith("def ")
    assert re.search(r"--- \[\d+ tokens, (stop|length), (fp32|bf16)\]", gen.stderr)  # with the dtype auto chose
    bad = fmkit("generate", str(tmp_path / "models" / "cli"), "--dtype", "fp16")
    _one_line_error(bad, "'fp16' is not one of 'auto', 'fp32', 'bf16'")
    listing = fmkit("registry", *ws)
    assert listing.returncode == 0
    for kind in ("tokenizer-", "shards-", "model-", "run-pretrain-"):
        assert kind in listing.stdout
