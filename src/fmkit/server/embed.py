"""/v1/embeddings: encoder models (all-MiniLM-L6-v2, any BERT-style folder) mean-pool their last hidden states
over the real tokens and L2-normalise, as sentence-transformers does for these models; decoders mean-pool their
final-normed hidden states the same way. `dimensions` keeps the first N components and re-normalises
(meaningful for models trained with nested, Matryoshka-style dimensions); `encoding_format: base64` is the
float32 little-endian bytes, as the OpenAI SDK decodes them."""
from __future__ import annotations

import base64

import numpy as np
import torch

from . import protocol as P


def inputs(body: dict, tok) -> tuple[list[str], list[list[int]]]:
    """(texts, token ids) per input: a string, strings, token ids, or arrays of token ids."""
    value = body.get("input")
    if value is None:
        raise P.APIError(400, "'input' is a required property", "input", "missing_required_parameter")
    def is_ids(v) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

    if isinstance(value, str):
        items = [value]
    elif is_ids(value):
        items = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) or is_ids(v) for v in value):
        items = value
    else:
        raise P.invalid("'input' must be a string, an array of strings, an array of token ids or an array of "
                        "arrays of token ids (none empty)", "input", "invalid_type")
    if len(items) > 2048:
        raise P.invalid(f"'input' takes at most 2048 items, got {len(items)}", "input")
    texts, ids = [], []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise P.invalid(f"input[{i}] is an empty string", "input", "empty_input")
            texts.append(item)
            ids.append(tok(item, add_special_tokens=False)["input_ids"])
        else:
            if not all(0 <= t < len(tok) for t in item):
                raise P.invalid(f"input[{i}] holds token ids outside this model's vocabulary", "input")
            texts.append(tok.decode(item))
            ids.append(item)
    return texts, ids


def embeddings(served, body: dict) -> tuple[list, int]:
    """(data items, prompt tokens) for a checked request; runs in a worker thread."""
    P.known_fields(body, P.EMBEDDING_FIELDS)
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise P.invalid(f"encoding_format must be float or base64, got {fmt!r}", "encoding_format")
    dims = P.get(body, "dimensions", (int,), None, 1)
    texts, ids = inputs(body, served.tok)
    for i, item in enumerate(ids):
        if len(item) > served.context:
            raise P.invalid(f"input[{i}] has {len(item)} tokens; this model takes at most {served.context}",
                            "input", "context_length_exceeded")
    if served.encoder is not None:
        vectors = served.compute.run(served.encoder.embed, texts)
    else:
        vectors = served.compute.run(lambda: np.stack([_decoder_vector(served.decoder, item) for item in ids]))
    if dims is not None:
        if dims > vectors.shape[1]:
            raise P.invalid(f"dimensions must be at most {vectors.shape[1]} for this model", "dimensions")
        vectors = vectors[:, :dims]
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    data = []
    for i, v in enumerate(vectors.astype("<f4")):
        emb = base64.b64encode(v.tobytes()).decode() if fmt == "base64" else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return data, sum(map(len, ids))


@torch.inference_mode()
def _decoder_vector(model, ids: list[int]) -> np.ndarray:
    if hasattr(model, "hidden"):        # fmkit's LlamaDecoder
        h = model.hidden(ids)
    else:                               # a transformers causal LM
        h = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].float()
    v = torch.nn.functional.normalize(h.mean(0), dim=-1)
    return v.numpy()
