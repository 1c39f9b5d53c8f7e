"""Build a model from an architecture preset as a transformers config, so every checkpoint loads with Auto*."""
from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path

import yaml

from ..errors import FmkitError

ARCHS = {"decoder": "llama", "encoder": "bert", "encoder-decoder": "t5"}
OBJECTIVE_FOR_ARCH = {"decoder": "causal_lm", "encoder": "masked_lm", "encoder-decoder": "span_corruption"}


@lru_cache
def presets() -> dict:
    return yaml.safe_load((Path(__file__).parent / "presets.yaml").read_text())


def arch_of(config) -> str:
    """The fmkit architecture name of a transformers config."""
    for arch, model_type in ARCHS.items():
        if config.model_type == model_type:
            return arch
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:   # BERT-likes also have a causal head: encoders
        return "encoder"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(config, "is_decoder", False):
        return "decoder"
    return config.model_type


def model_config(arch: str, preset: str, vocab_size: int, max_positions: int, special: dict,
                 overrides: dict | None = None):
    """A transformers config for `arch` at size `preset`, with fmkit's defaults and `overrides` applied."""
    from transformers import BertConfig, LlamaConfig, T5Config

    if arch not in ARCHS:
        raise FmkitError(f"unknown model.arch '{arch}'; choose one of {', '.join(ARCHS)}")
    table = presets()[arch]
    if preset not in table:
        raise FmkitError(f"unknown model.preset '{preset}' for {arch}; choose one of {', '.join(table)}")
    fields = dict(table[preset])
    common = dict(vocab_size=vocab_size, pad_token_id=special["pad"], eos_token_id=special["eos"])
    if arch == "decoder":
        cls = LlamaConfig
        fields.update(common, bos_token_id=special["eos"], max_position_embeddings=max_positions,
                      tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-5, attention_bias=False)
    elif arch == "encoder":
        cls = BertConfig
        fields.update(common, max_position_embeddings=max_positions, type_vocab_size=1,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    else:
        cls = T5Config
        # T5 has relative position buckets, not a position table: any length works; the trained length is recorded.
        # Tied embeddings, because only then does T5 scale the decoder output by d_model**-0.5 before the head: the
        # embedding is initialised with std 1, so an unscaled head gives logits of std sqrt(d_model) and a step-0
        # loss of 4-40x ln(vocab). (transformers 5 ties T5's head whatever the flag; False only drops the scaling.)
        fields.update(common, decoder_start_token_id=special["pad"], feed_forward_proj="gated-gelu",
                      dropout_rate=0.0, tie_word_embeddings=True, n_positions=max_positions)
    known = set(cls().to_dict())
    for key, value in (overrides or {}).items():
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise FmkitError(f"model.overrides.{key} is not a field of {cls.__name__}{hint}")
        fields[key] = value
    config = cls(**fields)
    if arch == "decoder" and config.num_attention_heads % config.num_key_value_heads:
        raise FmkitError(f"num_attention_heads ({config.num_attention_heads}) must be a multiple of "
                         f"num_key_value_heads ({config.num_key_value_heads})")
    return config


def auto_class(arch: str):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    return {"decoder": AutoModelForCausalLM, "encoder": AutoModelForMaskedLM,
            "encoder-decoder": AutoModelForSeq2SeqLM}[arch]


def build_model(config, seed: int = 0):
    """A freshly initialised model for `config` (same seed, same weights)."""
    import torch

    torch.manual_seed(seed)
    config._attn_implementation = "sdpa"
    model = auto_class(arch_of(config)).from_config(config)
    if config.model_type == "t5":
        # T5's logits are final_norm(h) @ embedding.T * d_model**-0.5, so at init their std is the final norm's gain
        # (1) times the embedding's std (1); that, and the tied head favouring the decoder's own input token, starts
        # 0.3-1.2 nats above ln(vocab). Half the gain starts within 3% of ln(vocab) and leaves the body as T5 has it.
        torch.nn.init.constant_(model.decoder.final_layer_norm.weight, 0.5)
    return model


def max_positions(config) -> int:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 0) or 1 << 30


def count_parameters(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
