"""Near-duplicate clustering on generated documents whose true word 5-gram Jaccard is known."""
import random
import string

import numpy as np

from fmkit.data.dedup import MinHashConfig, jaccard, minhash_clusters, shingle_set, signatures

VOCAB = ["".join(random.Random(i).choices(string.ascii_lowercase, k=6)) for i in range(3000)]


def document(seed: int, words: int = 400) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(words))


def jac(a: str, b: str) -> float:
    return jaccard(shingle_set(a, 5), shingle_set(b, 5))


def swapped_copy(text: str, seed: int, low: float, high: float) -> str:
    """`text` with words swapped for other words of the same text, one at a time, until its Jaccard with `text`
    falls to a target drawn from [low, high]; a swap that would take it below `low` is undone."""
    rng = random.Random(seed)
    words = text.split()
    target = rng.uniform(low, high)
    copy = list(words)
    for i in rng.sample(range(len(words)), len(words)):
        before, copy[i] = copy[i], rng.choice(words)
        similarity = jac(text, " ".join(copy))
        if similarity < low:
            copy[i] = before
        elif similarity <= target:
            break
    return " ".join(copy)


def clusters(texts: list[str], cfg: MinHashConfig | None = None) -> np.ndarray:
    cfg = cfg or MinHashConfig()
    return minhash_clusters(signatures(texts, cfg), cfg, lambda wanted: [texts[i] for i in wanted])


def test_pairs_at_jaccard_070_to_085_are_found_and_what_goes_is_close_to_its_survivor():
    originals = [document(i) for i in range(100)]
    copies = [swapped_copy(t, 1000 + i, 0.70, 0.85) for i, t in enumerate(originals)]
    assert all(0.70 <= jac(a, b) <= 0.85 for a, b in zip(originals, copies))
    texts = originals + copies
    order = random.Random(0).sample(range(len(texts)), len(texts))   # copies land before or after originals
    texts = [texts[i] for i in order]
    where = {k: p for p, k in enumerate(order)}
    root = clusters(texts)
    found = sum(root[where[i]] == root[where[100 + i]] for i in range(100))
    removed = np.flatnonzero(root != np.arange(len(texts)))
    close = sum(jac(texts[d], texts[root[d]]) >= 0.5 for d in removed)
    assert found / 100 >= 0.95
    assert len(removed) and close / len(removed) >= 0.99
    assert all(root[root[d]] == root[d] for d in removed)   # every cluster is rooted at a kept document


def test_a_pair_below_half_is_not_removed_even_through_a_chain():
    chain = [document(7)]
    for seed in (1, 2, 3):                                # each a near-copy of the one before
        chain.append(swapped_copy(chain[-1], seed, 0.74, 0.78))
    a, b, c, d = chain
    assert all(jac(x, y) >= 0.7 for x, y in zip(chain, chain[1:]))
    assert jac(a, c) < 0.7 and jac(a, d) < 0.5
    cfg = MinHashConfig()
    bands = signatures(chain, cfg).reshape(4, cfg.bands, cfg.rows)
    assert all((bands[i] == bands[i + 1]).all(axis=1).any() for i in range(3))   # LSH links the whole chain
    # b goes as a copy of a; c is too far from a to go with it and survives; d goes as a copy of c, not of a.
    assert clusters(chain, cfg).tolist() == [0, 0, 2, 2]
