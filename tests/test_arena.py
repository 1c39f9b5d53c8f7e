"""fmkit arena: the page in headless Chromium (vote, see it in SQLite, see the ratings move), the JSON API and its
refusals, answers streamed as server-sent events, randomised sides, preference export for DPO, and the
model-as-judge agreement with the voters."""
from __future__ import annotations

import json
import re
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import save_fmkit_llama
from fmkit.adapt.dpo import read_pairs
from fmkit.errors import FmkitError
from fmkit.providers import GenRequest, Model
from fmkit.select.arena import arena_db, arena_export, arena_judge, arena_ratings, build
from fmkit.select.arena_store import ArenaStore

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


class Running:
    """An ASGI app on a free local port in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.server.install_signal_handlers = lambda: None
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        assert self.server.started, "the arena did not start"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def call(url, body=None):
    """(status, JSON body) of a GET, or of a POST when there is a body (bytes are sent as they are)."""
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def events(url):
    """The server-sent events of one answer: [(event, data)]."""
    out, event = [], "message"
    with urllib.request.urlopen(url, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        for raw in r:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                out.append((event, json.loads(line[6:])))
                event = "message"
    return out


def write_candidates(path: Path, models: dict[str, dict]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"defaults": {"max_tokens": 16},
                                    "candidates": [{"name": n, **spec} for n, spec in models.items()]}))
    return path


class Canned(Model):
    """A model that answers every prompt with the same text (what the tests need to know the answers)."""

    capabilities = frozenset({"generate", "chat"})

    def __init__(self, name: str, text: str):
        super().__init__()
        self.name, self.text = name, text

    def generate(self, requests):
        return [self.text for _ in requests]

    chat = generate


@pytest.fixture(scope="module")
def local(tmp_path_factory, tokenizer_dir):
    """The arena over two tiny local candidates (one model folder, asked greedily and hot), served on a port."""
    root = tmp_path_factory.mktemp("arena")
    tiny = save_fmkit_llama(tokenizer_dir, root / "tiny", 256)
    cands = write_candidates(root / "pair.yaml", {
        "greedy": {"model": str(tiny), "temperature": 0.0},
        "hot": {"model": str(tiny), "temperature": 1.5, "seed": 7}})
    prompts = root / "prompts.txt"
    prompts.write_text("def add(a, b):\nclass Stack:\n")
    app = build(str(cands), str(prompts), workspace=str(root / "ws"), seed=0, bootstrap=50)
    with Running(app) as running:
        yield {"url": running.url, "app": app, "root": root, "candidates": cands,
               "db": arena_db(str(cands), workspace=str(root / "ws"))}


def finished_round(url, voter="ann", prompt="def f(x):"):
    """A round whose two answers are complete: (round id, {side: answer})."""
    status, r = call(url + "/api/rounds", {"prompt": prompt, "voter": voter})
    assert status == 200, r
    answers = {}
    for side in ("a", "b"):
        got = events(f"{url}/api/rounds/{r['round']}/{side}")
        assert got[-1][0] == "done" and not got[-1][1]["error"], got[-1]
        answers[side] = got[-1][1]["answer"]
        assert "".join(d["text"] for e, d in got[:-1]) == answers[side]
    return r["round"], answers


def test_answers_stream_as_events_and_are_stored_with_the_round(local):
    url = local["url"]
    round_id, answers = finished_round(url, prompt="def add(a, b):")
    pieces = events(f"{url}/api/rounds/{round_id}/a")
    assert len(pieces) > 2, "a local answer comes in several pieces, not at once"
    row = ArenaStore(local["db"]).round(round_id)
    assert (row["answer_a"], row["answer_b"]) == (answers["a"], answers["b"])
    assert {row["model_a"], row["model_b"]} == {"greedy", "hot"} and row["prompt"] == "def add(a, b):"
    assert "greedy" not in json.dumps(pieces) and "hot" not in json.dumps(pieces)   # anonymous until the vote
    status, drawn = call(url + "/api/prompt")
    assert status == 200 and drawn["prompt"] in ("def add(a, b):", "class Stack:")


def test_refused_votes_are_4xx_with_a_reason_and_counted(local):
    url = local["url"]
    round_id, _ = finished_round(url, voter="bob")
    cases = [({"round": "nope", "winner": "a", "voter": "bob"}, 404, "unknown_round"),
             ({"round": round_id, "winner": "left", "voter": "bob"}, 400, "bad_winner"),
             ({"round": round_id, "winner": "a", "voter": ""}, 400, "no_voter"),
             ({"round": round_id, "winner": "a", "voter": "eve"}, 403, "wrong_voter"),
             (b"{not json", 400, "bad_request")]
    before = ArenaStore(local["db"]).rejections()
    for body, code, reason in cases:
        status, doc = call(url + "/api/votes", body)
        assert (status, doc["error"]["reason"]) == (code, reason), doc
        assert doc["error"]["message"]
    status, ok = call(url + "/api/votes", {"round": round_id, "winner": "tie", "voter": "bob"})
    assert status == 200 and {ok["model_a"], ok["model_b"]} == {"greedy", "hot"}
    status, again = call(url + "/api/votes", {"round": round_id, "winner": "a", "voter": "bob"})
    assert status == 409 and again["error"]["reason"] == "already_voted"
    after = ArenaStore(local["db"]).rejections()
    for reason in ("unknown_round", "bad_winner", "no_voter", "wrong_voter", "bad_request", "already_voted"):
        assert after.get(reason, 0) == before.get(reason, 0) + 1, reason
    assert call(url + "/api/ratings")[1]["rejected"] == after


def test_sides_are_drawn_at_random_and_logged(tmp_path):
    cands = write_candidates(tmp_path / "c.yaml", {"x": {"model": "x"}, "y": {"model": "y"}, "z": {"model": "z"}})
    models = {n: Canned(n, f"answer of {n}") for n in "xyz"}
    app = build(str(cands), workspace=str(tmp_path), seed=1, models=models)
    hall = app.state.arena
    for _ in range(60):
        hall.start_round("q", "ann")
    deadline = time.time() + 30
    while not all(a.done for answers in hall.live.values() for a in answers.values()) and time.time() < deadline:
        time.sleep(0.02)
    rows = sqlite3.connect(arena_db(str(cands), workspace=str(tmp_path))).execute(
        "SELECT model_a, model_b, answer_a, answer_b FROM rounds").fetchall()
    assert len(rows) == 60 and all(a != b for a, b, _, _ in rows)
    assert all(aa == f"answer of {a}" and ab == f"answer of {b}" for a, b, aa, ab in rows)
    orders = {(a, b) for a, b, _, _ in rows}
    assert len(orders) == 6, "every pair turns up, each model on either side"
    left_x = sum(a == "x" for a, _, _, _ in rows)
    assert 10 <= left_x <= 30, left_x   # x meets another model in ~2/3 of rounds, on the left half the time


def test_voters_file_keys_are_required_and_votes_keep_the_name_only(tmp_path):
    from fmkit.select.arena_store import Rejected

    cands = write_candidates(tmp_path / "c.yaml", {"x": {"model": "x"}, "y": {"model": "y"}})
    (tmp_path / "voters.txt").write_text("# key name\nk-123 Ann Lee\n")
    app = build(str(cands), voters=str(tmp_path / "voters.txt"), workspace=str(tmp_path),
                models={n: Canned(n, f"answer of {n}") for n in "xy"})
    hall = app.state.arena
    with pytest.raises(Rejected, match="voters file") as refused:
        hall.start_round("q", "k-999")
    assert refused.value.status == 403 and refused.value.reason == "unknown_voter"
    round_id = hall.start_round("q", "k-123")["round"]
    while not all(a.done for a in hall.answers(round_id).values()):
        time.sleep(0.01)
    vote = hall.vote(round_id, "a", "k-123")
    assert vote["voter"] == "Ann Lee" and "k-123" not in json.dumps(hall.store.votes())


def test_export_writes_pairs_that_dpo_reads(tmp_path):
    store = ArenaStore(tmp_path / "a.db")
    for i, (winner, a, b) in enumerate([("a", "good", "bad"), ("b", "meh", "fine"), ("tie", "p", "q"),
                                        ("both_bad", "r", "s"), ("a", "same", "same")]):
        store.new_round(f"r{i}", f"prompt {i}", "ann", "m1", "m2")
        store.set_answer(f"r{i}", "a", a)
        store.set_answer(f"r{i}", "b", b)
        store.vote(f"r{i}", winner, "ann")
    out = arena_export(str(tmp_path / "a.db"), out=str(tmp_path / "prefs.jsonl"))
    assert out["pairs"] == 2 and out["skipped"] == {"tie": 1, "both_bad": 1, "same_answers": 1}
    pairs = read_pairs(tmp_path / "prefs.jsonl")
    assert [(p[0][0]["content"], p[1], p[2]) for p in pairs] == [("prompt 0", "good", "bad"),
                                                                ("prompt 1", "fine", "meh")]
    rows = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert (rows[1]["chosen_model"], rows[1]["rejected_model"], rows[1]["chosen_side"]) == ("m2", "m1", "b")


class LongerIsBetter(Model):
    """A deterministic judge: prefers the longer answer, calls equal lengths a tie."""

    name = "judge:longer"
    capabilities = frozenset({"chat"})

    def chat(self, requests: list[GenRequest]):
        out = []
        for r in requests:
            _, a, b = re.split(r"\[Answer of \w+ [AB]\]\n", r.prompt)   # eval's pairwise prompt, answers last
            a, b = a.rstrip("\n"), b.rstrip("\n")
            out.append("[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]")
        return out


def test_judge_agreement_with_the_voters(tmp_path):
    store = ArenaStore(tmp_path / "j.db")
    # (human winner, answer A, answer B): the judge prefers the longer answer
    votes = [("a", "long answer", "short"), ("b", "tiny", "much longer"), ("a", "x", "longer one"),
             ("tie", "same", "same"), ("both_bad", "aaaa", "b"), ("b", "bb", "cccc")]
    for i, (winner, a, b) in enumerate(votes):
        store.new_round(f"r{i}", f"q{i}", "ann", "m1" if i % 2 else "m2", "m2" if i % 2 else "m1")
        store.set_answer(f"r{i}", "a", a)
        store.set_answer(f"r{i}", "b", b)
        store.vote(f"r{i}", winner, "ann")
    result = arena_judge(str(tmp_path / "j.db"), judge_model=LongerIsBetter())
    # judge: a, b, b, tie, a, b -> agrees on 0, 1, 3 and 5 (a human "both bad" is no preference)
    assert result["new"] == 6 and result["judged"] == 6
    assert result["agreement"] == pytest.approx(4 / 6)
    assert result["decisive"] == 4 and result["decisive_agreement"] == pytest.approx(3 / 4)
    assert result["table"]["a"] == {"a": 1, "b": 1, "tie": 0} and result["order_dependent"] == 0
    assert arena_judge(str(tmp_path / "j.db"), judge_model=LongerIsBetter())["new"] == 0   # kept, not re-asked
    shown = arena_ratings(str(tmp_path / "j.db"), bootstrap=20)
    assert shown["judges"]["judge:longer"]["agreement"] == pytest.approx(4 / 6)
    assert {r["model"] for r in shown["judges"]["judge:longer"]["ratings"]} == {"m1", "m2"}
    first_shown = Canned("judge:first", "[[A]]")   # always the answer shown first: both orders cancel it out
    biased = arena_judge(str(tmp_path / "j.db"), judge_model=first_shown)
    assert biased["order_dependent"] == 6 and biased["table"]["a"] == {"a": 0, "b": 0, "tie": 2}
    with pytest.raises(FmkitError, match="no judge"):
        arena_judge(str(tmp_path / "j.db"))


def visible(text: str) -> str:
    """What a page shows of a text whatever its rendering does with spaces and control characters."""
    return "".join(ch for ch in text if ch.isprintable() and not ch.isspace())


def test_page_votes_land_in_sqlite_and_move_the_ratings(local):
    assert CHROMIUM.is_file(), f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver"
    assert CHROMEDRIVER.is_file(), f"{CHROMEDRIVER} is missing: apt-get install -y chromium-driver"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    url, db = local["url"], local["db"]
    wait = WebDriverWait(driver, 60)
    try:
        def ratings_text(expected_votes):
            driver.get(url + "/ratings")
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-votes")
                       == str(expected_votes))
            return driver.find_element(By.ID, "ratings").text

        def vote_once(prompt, button):
            driver.get(url + "/")
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
            driver.find_element(By.ID, "voter").clear()
            driver.find_element(By.ID, "voter").send_keys("carol")
            driver.find_element(By.ID, "prompt").send_keys(prompt)
            driver.find_element(By.ID, "ask").click()
            choice = driver.find_element(By.CSS_SELECTOR, f"[data-winner='{button}']")
            wait.until(lambda d: choice.is_enabled())
            shown = {s: driver.find_element(By.ID, f"answer-{s}").text for s in "ab"}
            assert not driver.find_element(By.ID, "who-a").text, "no names before the vote"
            choice.click()
            wait.until(lambda d: d.find_element(By.ID, "who-a").text)
            return shown, {s: driver.find_element(By.ID, f"who-{s}").text for s in "ab"}

        before = ArenaStore(db).count_votes()
        shown, names = vote_once("def square(x):", "a")
        rows = sqlite3.connect(db).execute("SELECT prompt, voter, winner, model_a, model_b, answer_a, answer_b "
                                           "FROM votes ORDER BY id DESC LIMIT 1").fetchall()
        prompt, voter, winner, model_a, model_b, answer_a, answer_b = rows[0]
        assert (prompt, voter, winner) == ("def square(x):", "carol", "a")
        assert (model_a, model_b) == (names["a"], names["b"]), "the names revealed are the sides logged"
        assert (visible(shown["a"]), visible(shown["b"])) == (visible(answer_a), visible(answer_b))
        first = ratings_text(before + 1)
        assert names["a"] in first and names["b"] in first
        vote_once("def cube(x):", "b")
        second = ratings_text(before + 2)
        assert second != first, "another vote moves the ratings"
        assert ArenaStore(db).count_votes() == before + 2
    finally:
        driver.quit()


def test_ratings_verb_prints_and_returns_the_table(local, capsys):
    from click.testing import CliRunner

    from fmkit.cli import app

    finished = finished_round(local["url"], voter="dan")[0]
    assert call(local["url"] + "/api/votes", {"round": finished, "winner": "a", "voter": "dan"})[0] == 200
    out = CliRunner().invoke(app, ["arena", "ratings", str(local["db"]), "--bootstrap", "20", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert {r["model"] for r in doc["ratings"]} == {"greedy", "hot"} and doc["votes"] >= 1
    missing = CliRunner().invoke(app, ["arena", "ratings", str(local["root"] / "none.yaml"), "-w",
                                       str(local["root"])])
    assert missing.exit_code != 0


def test_local_models_stream_token_by_token_and_hosted_ones_through_the_sdk(local):
    from fmkit.providers import get_model
    from fmkit.server.launch import Background

    tiny = local["root"] / "tiny"
    model = get_model(str(tiny), dtype="fp32")
    req = GenRequest("def add(a, b):", [], 12, 0.0)
    pieces = list(model.stream(req))
    assert len(pieces) > 1 and "".join(pieces) == model.generate([req])[0]
    with Background(models=[str(tiny)], dtype="fp32") as base_url:
        hosted = get_model("openai:tiny", base_url=base_url)
        streamed = list(hosted.stream(req))
        assert len(streamed) > 1 and "".join(streamed) == hosted.generate([req])[0]
        assert hosted.usage.requests == 2 and hosted.usage.completion_tokens > 0
