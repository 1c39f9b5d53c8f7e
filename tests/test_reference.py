"""Model references: one resolver for folders, adapters, hub ids and hosted models; an adapter scores and generates
exactly as the model merged from it."""
import json
import os
import subprocess
import sys

import pytest

from fmkit.adapt.finetune import finetune, merge
from fmkit.errors import FmkitError
from fmkit.evals.runner import evaluate
from fmkit.models.generate import Generator
from fmkit.models.reference import resolve
from fmkit.providers import get_model


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_dir):
    from conftest import save_fmkit_llama

    return save_fmkit_llama(tokenizer_dir, tmp_path_factory.mktemp("base") / "model", 256)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, base):
    d = tmp_path_factory.mktemp("adapter")
    rows = [{"messages": [{"role": "user", "content": f"Name {i}."}, {"role": "assistant", "content": f"def f{i}():"}]}
            for i in range(16)]
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return finetune(base, d / "train.jsonl", d / "lora", lora=True, steps=6, batch_size=8, lr=1e-2,
                    workspace=d / "ws")


@pytest.fixture(scope="module")
def merged(tmp_path_factory, adapter):
    return merge(adapter, tmp_path_factory.mktemp("merged") / "model")


def test_each_form_resolves_to_its_kind(base, adapter):
    assert resolve(base).kind == "folder"
    ref = resolve(adapter)
    assert ref.kind == "adapter" and ref.base.path.resolve() == base.resolve()
    assert resolve("openai:gpt-4o-mini").kind == "openai" and resolve("openai:gpt-4o-mini").name == "gpt-4o-mini"
    assert resolve("anthropic:claude-x").kind == "anthropic"
    assert resolve("hf:org/name").kind == "hf" and resolve("hf:org/name").name == "org/name"


def test_adapter_base_comes_from_peft_config_without_fmkit_json_and_base_overrides(tmp_path, base, adapter):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(adapter, bare, ignore=shutil.ignore_patterns("fmkit.json", "checkpoints"))
    cfg = json.loads((bare / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (bare / "adapter_config.json").write_text(json.dumps(cfg))
    assert resolve(bare).base.path == base
    cfg["base_model_name_or_path"] = None
    (bare / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FmkitError, match="does not say which model.*--base"):
        resolve(bare)
    assert resolve(bare, base=base).base.path == base


@pytest.mark.parametrize("spec, message", [
    ("no/such/folder", "no such folder .*and not openai:NAME, anthropic:NAME or hf:ORG/NAME"),
    ("gpt:4", "unknown prefix 'gpt:'"),
    ("openai:", "names no model"),
    ("hf:a/b/c", "not a hub id"),
])
def test_bad_references_fail_in_one_sentence(spec, message):
    with pytest.raises(FmkitError, match=message) as e:
        resolve(spec)
    assert "\n" not in str(e.value)


def test_a_folder_that_is_neither_model_nor_adapter_is_named(tmp_path, base):
    with pytest.raises(FmkitError, match="neither a model folder .* nor an adapter folder"):
        resolve(tmp_path)
    with pytest.raises(FmkitError, match="applies to adapters only"):
        resolve(base, base=base)


def test_adapter_scores_exactly_like_its_merged_model(tmp_path, adapter, merged):
    a = evaluate(adapter, ["stdlib_docstring_to_name"], out=tmp_path / "a", limit=12, workspace=tmp_path / "ws")
    m = evaluate(merged, ["stdlib_docstring_to_name"], out=tmp_path / "m", limit=12, workspace=tmp_path / "ws")
    rows_a = [json.loads(line) for line in (a / "samples.jsonl").read_text().splitlines()]
    rows_m = [json.loads(line) for line in (m / "samples.jsonl").read_text().splitlines()]
    assert len(rows_a) == len(rows_m) == 12
    for ra, rm in zip(rows_a, rows_m):
        assert ra["loglikelihoods"] == pytest.approx(rm["loglikelihoods"], abs=1e-4)
    base_rows = evaluate(resolve(adapter).base.path, ["stdlib_docstring_to_name"], out=tmp_path / "b", limit=12,
                         workspace=tmp_path / "ws")
    lls_base = [json.loads(line)["loglikelihoods"] for line in (base_rows / "samples.jsonl").read_text().splitlines()]
    assert max(abs(x - y) for r, b in zip(rows_a, lls_base) for x, y in zip(r["loglikelihoods"], b)) > 1e-3
    assert json.loads((a / "results.json").read_text())["model"]["kind"] == "adapter"


def test_adapter_generates_the_merged_models_greedy_tokens(adapter, merged):
    prompts = ["def ", "<|user|>\nName 3.\n<|assistant|>\n"]
    for dtype in ("fp32", "auto"):
        a = Generator(adapter, dtype)(prompts, 24, temperature=0)
        m = Generator(merged, dtype)(prompts, 24, temperature=0)
        assert [c.tokens for c in a] == [c.tokens for c in m]
    from peft import PeftModel

    assert isinstance(resolve(adapter).load(merge=False), PeftModel)   # unmerged, the adapter stays switchable


def test_get_model_takes_any_reference(adapter, base, monkeypatch):
    desc = get_model(str(adapter)).describe()
    assert desc["kind"] == "adapter" and desc["lineage"]["base"] == str(base)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(FmkitError, match="no API key for openai"):
        get_model("openai:gpt-4o-mini")
    assert get_model("openai:gpt-4o-mini", base_url="http://127.0.0.1:9/v1").name == "openai:gpt-4o-mini"


def test_a_hub_id_loads_from_the_hub_cache_with_the_real_loading_code(tmp_path, base):
    """hf:ORG/NAME goes through transformers' from_pretrained; offline, the hub cache answers it."""
    import shutil

    snap = tmp_path / "hub" / "models--fmkit-test--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(base, snap)
    (tmp_path / "hub" / "models--fmkit-test--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--fmkit-test--tiny" / "refs" / "main").write_text("a" * 40)
    code = ("import sys; from fmkit.models.generate import Generator;"
            "a = Generator('hf:fmkit-test/tiny', 'fp32')(['def '], 8, temperature=0)[0].tokens;"
            f"b = Generator({str(base)!r}, 'fp32')(['def '], 8, temperature=0)[0].tokens;"
            "print(a == b)")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "True", out.stderr[-2000:]


def test_an_unreachable_hub_id_fails_in_one_line_on_the_command_line(tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "fmkit", "generate", "hf:fmkit-test/absent", "--prompt", "def "],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "hf:fmkit-test/absent could not be loaded from the Hugging Face hub" in lines[0]
