import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

from fmkit.errors import FmkitError
from fmkit.models.build import build_model, count_parameters, model_config, presets
from fmkit.models.io import load_model, save_model

SPECIAL = {"pad": 1, "eos": 0}


@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder-decoder"])
def test_presets_span_one_million_to_a_billion_parameters(arch):
    sizes = []
    for name in presets()[arch]:
        with torch.device("meta"):
            sizes.append(count_parameters(build_model(model_config(arch, name, 32000, 2048, SPECIAL))))
    assert min(sizes) < 3e6 and max(sizes) > 1e9 * 0.95


def test_decoder_preset_is_llama_with_gqa():
    cfg = model_config("decoder", "40m", 1000, 128, SPECIAL)
    assert cfg.model_type == "llama" and cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.hidden_act == "silu" and cfg.tie_word_embeddings


@pytest.mark.parametrize("arch, auto", [("decoder", AutoModelForCausalLM), ("encoder", AutoModelForMaskedLM),
                                        ("encoder-decoder", AutoModelForSeq2SeqLM)])
def test_transformers_loads_the_same_logits_as_fmkit(tmp_path, tokenizer_dir, arch, auto):
    model = build_model(model_config(arch, "tiny", 512, 64, SPECIAL), seed=3)
    save_model(model, tmp_path, tokenizer_dir, {"kind": "model"})
    ours, theirs = load_model(tmp_path), auto.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(2, 512, (2, 16))
    kwargs = {"decoder_input_ids": ids[:, :5]} if arch == "encoder-decoder" else {}
    with torch.no_grad():
        a, b = ours(input_ids=ids, **kwargs).logits, theirs(input_ids=ids, **kwargs).logits
    assert torch.equal(a, b)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "tokenizer.json").exists()


def test_pickle_weights_are_refused_unless_trusted(tmp_path):
    model = build_model(model_config("decoder", "tiny", 300, 32, SPECIAL))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(FmkitError, match="refusing to load .*pytorch_model.bin.*--trust-pickle"):
        load_model(tmp_path)
    loaded = load_model(tmp_path, trust_pickle=True)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_truncated_safetensors_is_reported(tmp_path, tokenizer_dir):
    save_model(build_model(model_config("decoder", "tiny", 512, 32, SPECIAL)), tmp_path, tokenizer_dir, {})
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(FmkitError, match="corrupt or truncated"):
        load_model(tmp_path)


def test_unknown_config_override_suggests_the_field():
    with pytest.raises(FmkitError, match="did you mean 'hidden_size'"):
        model_config("decoder", "tiny", 512, 32, SPECIAL, {"hiden_size": 8})
    with pytest.raises(FmkitError, match="unknown model.preset 'huge'"):
        model_config("decoder", "huge", 512, 32, SPECIAL)
