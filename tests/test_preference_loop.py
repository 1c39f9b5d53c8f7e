"""Human preference end to end: simulated voters in an arena database, its export as preference pairs, and a
reward model trained on them that beats chance on held-out pairs from the same export."""
import json
import random

from conftest import save_fmkit_llama
from fmkit.select.stats import sign_test

WORDS = "alpha beta gamma delta river stone cloud paper green light table water".split()


def answer(rng, polite: bool) -> str:
    words = [rng.choice(WORDS) for _ in range(5 if polite else 6)]
    if polite:
        words.insert(rng.randrange(6), "please")
    return " ".join(words)


def test_a_reward_model_learns_the_arena_votes(tmp_path, tokenizer_dir, one_thread):
    from fmkit.adapt.reward import reward, score
    from fmkit.select.arena import arena_export
    from fmkit.select.arena_store import ArenaStore

    rng = random.Random(0)
    store = ArenaStore(tmp_path / "arena.db")
    for i in range(150):   # voters who prefer the polite model's answer nine times in ten; sides drawn at random
        left_polite = rng.random() < 0.5
        rid = f"r{i}"
        store.new_round(rid, f"Request {i}", "sim", *(("polite", "terse") if left_polite else ("terse", "polite")))
        store.set_answer(rid, "a", answer(rng, left_polite))
        store.set_answer(rid, "b", answer(rng, not left_polite))
        wins_polite = rng.random() < 0.9
        store.vote(rid, "a" if left_polite == wins_polite else "b", "sim")
    store.close()
    out = arena_export(str(tmp_path / "arena.db"), str(tmp_path / "prefs.jsonl"))
    assert out["pairs"] == 150
    rows = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:110]))
    held = rows[110:]

    llama = save_fmkit_llama(tokenizer_dir, tmp_path / "base", 128)
    rm = reward(llama, tmp_path / "train.jsonl", tmp_path / "rm", steps=30, batch_size=8, lr=1e-3,
                workspace=tmp_path / "ws", holdout=0)
    prompts = [r["prompt"] for r in held]
    chosen = score(rm, prompts, [r["chosen"] for r in held])
    rejected = score(rm, prompts, [r["rejected"] for r in held])
    right = [float(c > r) for c, r in zip(chosen, rejected)]
    assert sum(right) / len(right) > 0.75   # the voters themselves agree with "polite" 90% of the time
    assert sign_test(int(sum(right)), len(right) - int(sum(right)))["p_value"] < 0.01   # against a coin
