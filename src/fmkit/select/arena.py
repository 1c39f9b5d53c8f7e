"""`fmkit arena`: people vote between two anonymous candidates' answers on a local web page; Bradley–Terry ratings
from the votes; a model as judge on the same answers, with its agreement with the voters; the votes as preference
pairs for `fmkit dpo` and the reward model.

The arena is named after its candidates file: votes go to <workspace>/arena/NAME.db (`--db` to choose), and every
other arena verb takes either that candidates file or the database itself.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import FmkitError
from ..progress import console, status
from ..providers import Model
from ..workspace import default_root
from .arena_standings import standings
from .arena_store import ArenaStore
from .candidates import load_candidates, open_judge


def arena_db(source: str, db: str | None = None, workspace: str | Path | None = None) -> Path:
    """The arena's database: --db, a .db given as the source, or <workspace>/arena/NAME.db for NAME.yaml."""
    if db:
        return Path(db)
    if Path(source).suffix == ".db":
        return Path(source)
    return (Path(workspace) if workspace else default_root()) / "arena" / f"{Path(source).stem}.db"


def _existing(source: str, db: str | None, workspace) -> ArenaStore:
    path = arena_db(source, db, workspace)
    if not path.is_file():
        raise FmkitError(f"no arena database at {path}: start the arena with `fmkit arena {source}` first, or "
                         "pass --db")
    return ArenaStore(path)


def load_prompts(path: str) -> list[str]:
    """Prompts to draw from: a .jsonl suite (rows with text `input`, as `fmkit compare` reads) or a text file with
    one prompt per line."""
    p = Path(path)
    if not p.is_file():
        raise FmkitError(f"prompts file {p} not found")
    if p.suffix == ".jsonl":
        from .suite import load_suite

        items = load_suite(str(p)).items
        bad = next((i for i in items if not isinstance(i.input, str)), None)
        if bad is not None:
            raise FmkitError(f"{p}:{bad.line}: the arena shows text prompts; give 'input' as text")
        return [i.input for i in items]
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise FmkitError(f"prompts file {p} holds no prompt")
    return prompts


def load_voters(path: str) -> dict[str, str]:
    """{key: name} from a file of `KEY NAME` lines (# starts a comment); votes are stored under the name only."""
    p = Path(path)
    if not p.is_file():
        raise FmkitError(f"voters file {p} not found")
    out: dict[str, str] = {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 1)
        if len(parts) < 2:
            raise FmkitError(f"{p}:{n}: expected KEY NAME (the name is what the votes record, never the key)")
        if parts[0] in out:
            raise FmkitError(f"{p}:{n}: key is already given to {out[parts[0]]}")
        out[parts[0]] = parts[1].strip()
    if not out:
        raise FmkitError(f"voters file {p} holds no voter")
    return out


def build(candidates: str, prompts: str | None = None, db: str | None = None, voters: str | None = None,
          seed: int | None = None, bootstrap: int = 200, workspace: str | Path | None = None,
          models: dict[str, Model] | None = None):
    """The arena's ASGI app with its models opened (what `arena` serves and tests start)."""
    try:
        from .arena_app import Arena, create_app
    except ImportError:
        raise FmkitError("fmkit arena needs FastAPI and uvicorn: pip install 'fmkit[serve]'") from None
    if bootstrap < 10:
        raise FmkitError(f"--bootstrap must be at least 10, got {bootstrap}")
    cands = load_candidates(candidates)
    drawn = load_prompts(prompts) if prompts else []
    keys = load_voters(voters) if voters else None
    store = ArenaStore(arena_db(candidates, db, workspace))
    store.set_meta("candidates", str(Path(candidates).resolve()))
    hall = Arena(cands, store, drawn, keys, seed, workspace, models)
    status(f"arena: opening {len(hall.candidates)} candidates")
    hall.open_all()   # a bad model reference fails here, not in a voter's first round
    return create_app(hall, bootstrap)


def arena(candidates: str, prompts: str | None = None, host: str = "127.0.0.1", port: int = 8080,
          db: str | None = None, voters: str | None = None, seed: int | None = None, bootstrap: int = 200,
          workspace: str | Path | None = None) -> dict:
    """Serve the arena: a web page where people vote between two anonymous candidates' answers.

    Each round shows a prompt (typed, or drawn from --prompts) and two candidates' answers streamed side by side,
    which candidate is on the left drawn at random; the names are shown after the vote. Votes go to SQLite with
    the prompt, both answers, the sides, the voter and the time. /ratings shows the Bradley–Terry ratings.
    Ctrl-C stops it.

    Args:
        candidates: Candidates YAML (as `fmkit compare` reads): at least two models with generation settings.
        prompts: Prompts to draw from: a text file with one per line, or a .jsonl suite with text 'input'.
        host: Address to listen on (0.0.0.0 for every interface).
        port: Port to listen on.
        db: Votes database (default <workspace>/arena/NAME.db, NAME the candidates file's name).
        voters: File of KEY NAME lines: voters must give a key, and their votes are recorded under the name.
        seed: Seed of the draws of pairs, sides and prompts (default: different every start).
        bootstrap: Bootstrap resamples for the ratings page's intervals.
        workspace: Workspace folder: the arena's database and bare model names.
    """
    import uvicorn

    app = build(candidates, prompts, db, voters, seed, bootstrap, workspace)
    store = app.state.arena.store
    console.print(f"arena of {len(app.state.arena.candidates)} candidates on http://{host}:{port} (ratings: "
                  f"http://{host}:{port}/ratings; {store.count_votes()} votes so far in {store.path})",
                  highlight=False, soft_wrap=True)
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()
    except OSError as e:
        raise FmkitError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    after = ArenaStore(store.path)   # the app closed its own connection on the way out
    votes = after.count_votes()
    after.close()
    return {"url": f"http://{host}:{port}", "db": str(store.path), "votes": votes}


def arena_ratings(source: str, length_control: bool = False, bootstrap: int = 200, seed: int = 0,
                  db: str | None = None, workspace: str | Path | None = None) -> dict:
    """Print the arena's Bradley–Terry ratings with intervals, win rates, position bias and judge agreement.

    Args:
        source: The arena's candidates YAML, or its votes database (.db).
        length_control: Fit the answers' length difference beside the ratings (a style covariate), so that no
            model is rated up only for longer answers.
        bootstrap: Bootstrap resamples for the 95% intervals.
        seed: Seed of the bootstrap.
        db: Votes database (default <workspace>/arena/NAME.db).
        workspace: Workspace folder where the arena's database is.
    """
    if bootstrap < 10:
        raise FmkitError(f"--bootstrap must be at least 10, got {bootstrap}")
    store = _existing(source, db, workspace)
    result = standings(store, length_control, bootstrap, seed)
    store.close()
    _print_standings(result)
    return result


def _num(x, digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _print_standings(r: dict) -> None:
    from rich.table import Table

    t = Table(title=f"arena ratings from {r['votes']} votes" + (" (length controlled)" if r["length_control"]
                                                                 else "") + ", 95% bootstrap intervals")
    for col, just in (("model", "left"), ("rating", "right"), ("interval", "right"), ("votes", "right")):
        t.add_column(col, justify=just)
    for row in r["ratings"]:
        t.add_row(row["model"], _num(row["rating"]), f"{_num(row['ci'][0])} - {_num(row['ci'][1])}",
                  str(row["votes"]))
    console.print(t)
    p = r["position_bias"]
    console.print(f"position: left won {p['left_wins']}, right won {p['right_wins']} of the decisive votes "
                  f"(left share {_num(p['left_share'], 3)}, p = {_num(p['p_value'], 4)})", highlight=False)
    if r["length_coefficient"] is not None:
        console.print(f"length coefficient {r['length_coefficient']:+.3f} (logit per unit of normalised length "
                      "difference)", highlight=False)
    if r["rejected"]:
        console.print("rejected: " + ", ".join(f"{k} {n}" for k, n in r["rejected"].items()), highlight=False)
    for name, j in r["judges"].items():
        console.print(f"judge {name}: agrees on {_num(j['agreement'], 3)} of {j['judged']} votes, on "
                      f"{_num(j['decisive_agreement'], 3)} of the {j['decisive']} decisive ones "
                      f"(kappa {_num(j['kappa'], 3)})", highlight=False, soft_wrap=True)


def arena_export(source: str, out: str | None = None, db: str | None = None,
                 workspace: str | Path | None = None) -> dict:
    """Write the arena's votes as preference JSONL (prompt, chosen, rejected) for `fmkit dpo` and reward models.

    A vote for A or B is one pair, the preferred answer chosen; ties and "both bad" prefer neither and are left
    out, as are votes whose answers are the same text or empty; each is counted. Each line also carries the vote,
    voter, time and both models.

    Args:
        source: The arena's candidates YAML, or its votes database (.db).
        out: Output JSONL (default: beside the database, NAME.preferences.jsonl).
        db: Votes database (default <workspace>/arena/NAME.db).
        workspace: Workspace folder where the arena's database is.
    """
    store = _existing(source, db, workspace)
    votes = store.votes()
    target = Path(out) if out else store.path.with_suffix(".preferences.jsonl")
    store.close()
    skipped: dict[str, int] = {}
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(target, "w", encoding="utf-8") as f:
        for v in votes:
            why = None if v["winner"] in ("a", "b") else v["winner"]
            if why is None:
                won, lost = (v["winner"], "b" if v["winner"] == "a" else "a")
                chosen, rejected = v[f"answer_{won}"], v[f"answer_{lost}"]
                why = "empty_answer" if not chosen.strip() or not rejected.strip() else \
                    "same_answers" if chosen == rejected else None
            if why:
                skipped[why] = skipped.get(why, 0) + 1
                continue
            f.write(json.dumps({"prompt": v["prompt"], "chosen": chosen, "rejected": rejected, "vote": v["id"],
                                "voter": v["voter"], "time": v["time"], "chosen_model": v[f"model_{won}"],
                                "rejected_model": v[f"model_{lost}"], "chosen_side": won},
                               ensure_ascii=False) + "\n")
            written += 1
    console.print(f"{written} preference pairs from {len(votes)} votes written to {target}"
                  + (f"; left out: {', '.join(f'{k} {n}' for k, n in skipped.items())}" if skipped else ""),
                  highlight=False, soft_wrap=True)
    return {"out": str(target), "pairs": written, "votes": len(votes), "skipped": skipped}


def arena_judge(source: str, judge: str = "", judge_base_url: str = "", limit: int = 0, max_tokens: int = 512,
                db: str | None = None, workspace: str | Path | None = None, judge_model: Model | None = None) -> dict:
    """Judge the arena's voted answers with a model, in both orders, and report its agreement with the voters.

    The judge sees each vote's prompt and two answers twice, A first and B first (as `fmkit eval`'s pairwise
    judge does); an answer wins only when preferred both times, anything else is a tie. Verdicts are kept in the
    database, so a rerun judges only new votes; the ratings page and `arena ratings` show the agreement and the
    ratings the judge's verdicts give. `judge_model` (Python only) is a `Model` used as the judge.

    Args:
        source: The arena's candidates YAML (its judge: is the default judge), or its votes database (.db).
        judge: Judge model reference (default: the candidates file's judge:).
        judge_base_url: OpenAI-compatible server URL for an openai:NAME judge.
        limit: Judge at most this many new votes (0: all).
        max_tokens: Most tokens of each judgement.
        db: Votes database (default <workspace>/arena/NAME.db).
        workspace: Workspace folder where the arena's database is.
    """
    from ..evals.judge import grade_pairwise

    if limit < 0:
        raise FmkitError(f"--limit must be 0 or more, got {limit}")
    store = _existing(source, db, workspace)
    if judge_model is None:
        spec = {"model": judge, "base_url": judge_base_url} if judge else None
        candidates = source if Path(source).suffix != ".db" else store.meta("candidates")
        if spec is None and candidates and Path(candidates).is_file():
            spec = load_candidates(candidates).judge or None
        if spec is None:
            raise FmkitError("no judge: pass --judge MODEL, or set judge: {model: ...} in the candidates file")
        judge_model = open_judge(spec)
    name = judge_model.name
    votes = store.votes()
    done = store.judgements(name)
    todo = [v for v in votes if v["id"] not in done]
    todo = todo[:limit] if limit else todo
    for start in range(0, len(todo), 32):   # stored as it goes: an interrupted run keeps what it judged
        part = todo[start:start + 32]
        status(f"arena judge: {start + len(part)} of {len(todo)} votes")
        graded = grade_pairwise(judge_model, [v["prompt"] for v in part], [v["answer_a"] for v in part],
                                [v["answer_b"] for v in part], max_tokens)
        for v, g in zip(part, graded):
            winner = {"win": "a", "loss": "b"}.get(g["outcome"], "tie")
            store.add_judgement(v["id"], name, winner, json.dumps(g["verdicts"]))
    result = standings(store, bootstrap=100)
    store.close()
    j = result["judges"].get(name, {"judged": 0})
    report = {"judge": name, "new": len(todo), **j}
    console.print(f"judge {name}: {len(todo)} new votes judged; agrees with the voters on "
                  f"{_num(j.get('agreement'), 3)} of {j['judged']} (decisive votes: "
                  f"{_num(j.get('decisive_agreement'), 3)} of {j.get('decisive', 0)}; kappa {_num(j.get('kappa'), 3)}"
                  f"; verdicts that changed with the order: {j.get('order_dependent', 0)}, unparsable: "
                  f"{j.get('unparsable', 0)})", highlight=False, soft_wrap=True)
    return report
