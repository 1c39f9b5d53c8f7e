"""The platform on fmkit serve over real HTTP with the real openai SDK: files, fine-tuning jobs run by worker
processes (cancel and pause from each state, events, checkpoints, a restart mid-job, a killed worker) and the
isolation between tenants' keys."""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import time
import urllib.request

import openai
import pytest

from conftest import save_fmkit_llama
from fmkit.server.launch import Background

KEYS = "sk-alice name=alice\nsk-bob name=bob\nsk-root name=ops admin\n"


def conversations(n: int, offset: int = 0) -> str:
    rows = [{"messages": [{"role": "system", "content": "You are a support agent."},
                          {"role": "user", "content": f"My order {i + offset} has not arrived."},
                          {"role": "assistant", "content": f"Sorry about order {i + offset}; I will check it now."}]}
            for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def root(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("platform")
    save_fmkit_llama(tokenizer_dir, root / "tiny", 128)
    (root / "keys.txt").write_text(KEYS)
    (root / "support_conversations.jsonl").write_text(conversations(11))
    return root


def start(root, ws="ws", **kw):
    return Background(names={"gpt-4o-mini": str(root / "tiny")}, api_keys=str(root / "keys.txt"), dtype="fp32",
                      workspace=str(root / ws), **kw)


@pytest.fixture(scope="module")
def server(root):
    bg = start(root, max_jobs=2)
    with bg as url:
        yield bg, url


def client(url, key="sk-alice"):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0)


def wait(c, job_id, states=("succeeded", "failed", "cancelled"), timeout=180):
    end = time.time() + timeout
    while time.time() < end:
        job = c.fine_tuning.jobs.retrieve(job_id)
        if job.status in states:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} is still {job.status}")


def upload(c, root, text, name="data.jsonl", purpose="fine-tune"):
    path = root / name
    path.write_text(text)
    with open(path, "rb") as f:
        return c.files.create(file=f, purpose=purpose)


def test_the_acceptance_program_runs_and_the_fine_tuned_model_answers(server, root):
    _, url = server
    client_ = openai.OpenAI(base_url=url, api_key="sk-alice")
    response = client_.chat.completions.create(model="gpt-4o-mini", messages=[
        {"role": "user", "content": "Summarize the key risks of foundation models."}], max_tokens=8)
    assert response.choices[0].message.content is not None
    started = time.time()
    long = {"messages": [{"role": "user", "content": "tell me everything " * 100},
                         {"role": "assistant", "content": "ok"}]}
    with open(root / "support_conversations.jsonl", "a") as f:   # one over the context: truncated, and said so
        f.write(json.dumps(long) + "\n")
    training_file = client_.files.create(file=open(root / "support_conversations.jsonl", "rb"),
                                         purpose="fine-tuning")
    fine_tune_job = client_.fine_tuning.jobs.create(training_file=training_file.id, model="gpt-4o-mini",
                                                    hyperparameters={"n_epochs": 3})
    assert fine_tune_job.id.startswith("ftjob-") and fine_tune_job.status == "validating_files"
    job = wait(client_, fine_tune_job.id)
    print(f"acceptance job: {time.time() - started:.1f} s")
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:gpt-4o-mini::{job.id[-8:]}"
    assert job.hyperparameters.n_epochs == 3 and job.hyperparameters.batch_size == 2
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at
    reply = client_.chat.completions.create(model=job.fine_tuned_model, max_tokens=12, temperature=0,
                                            messages=[{"role": "user", "content": "My order 3 has not arrived."}])
    assert reply.model == job.fine_tuned_model and reply.choices[0].message.content
    assert job.fine_tuned_model in [m.id for m in client_.models.list()]

    # the metrics CSV, uploaded as a result file
    results = client_.files.retrieve(job.result_files[0])
    assert results.purpose == "fine-tune-results"
    table = list(csv.DictReader(io.StringIO(client_.files.content(results.id).text)))
    assert [int(r["step"]) for r in table][-1] == 18 and float(table[-1]["train_loss"]) < float(table[0]["train_loss"])

    # events, newest first, paginated; metrics events carry the step's figures
    events = client_.fine_tuning.jobs.list_events(job.id, limit=5)
    assert len(events.data) == 5 and events.has_more
    later = client_.fine_tuning.jobs.list_events(job.id, limit=5, after=events.data[-1].id)
    assert not {e.id for e in later.data} & {e.id for e in events.data}
    every = list(client_.fine_tuning.jobs.list_events(job.id, limit=100))
    assert every[0].message == "The job has successfully completed"
    assert any(e.level == "warn" and "1 truncated to the context" in e.message for e in every)
    metrics = [e for e in every if e.type == "metrics"]
    assert metrics and {"step", "train_loss", "total_steps", "train_mean_token_accuracy"} <= set(metrics[0].data)

    # a checkpoint per epoch, each servable by its own name
    ckpts = client_.fine_tuning.jobs.checkpoints.list(job.id).data
    assert sorted(c.step_number for c in ckpts) == [6, 12, 18]
    first = min(ckpts, key=lambda c: c.step_number)
    assert first.metrics.train_loss is not None and 0 <= first.metrics.train_mean_token_accuracy <= 1
    out = client_.chat.completions.create(model=first.fine_tuned_model_checkpoint, max_tokens=4,
                                          messages=[{"role": "user", "content": "hi"}])
    assert out.model == first.fine_tuned_model_checkpoint
    scrape = urllib.request.urlopen(url.removesuffix("/v1") + "/metrics").read().decode()
    assert 'fmkit_fine_tuning_jobs{status="succeeded"}' in scrape


def test_files_endpoints(server, root):
    _, url = server
    c = client(url, "sk-bob")
    made = [upload(c, root, conversations(2, k), f"bob{k}.jsonl") for k in range(3)]
    other = upload(c, root, "anything at all", "notes.txt", purpose="user_data")
    assert other.purpose == "user_data" and other.bytes == len("anything at all")
    listed = c.files.list(limit=2)
    assert [f.id for f in listed.data] == [other.id, made[2].id] and listed.has_more
    nxt = c.files.list(limit=2, after=made[2].id)
    assert [f.id for f in nxt.data] == [made[1].id, made[0].id]
    oldest = c.files.list(order="asc", purpose="fine-tune")
    assert [f.id for f in oldest.data] == [f.id for f in made] and not oldest.has_more
    assert c.files.retrieve(made[0].id).filename == "bob0.jsonl"
    assert c.files.content(made[1].id).text == conversations(2, 1)
    assert c.files.delete(made[0].id).deleted
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(made[0].id)

    with pytest.raises(openai.BadRequestError) as e:
        upload(c, root, "x", "x.jsonl", purpose="pictures")
    assert "fine-tune" in e.value.message and "batch" in e.value.message
    bad = conversations(1) + "not json\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
    with pytest.raises(openai.BadRequestError) as e:
        upload(c, root, bad, "bad.jsonl")
    assert "line 2: invalid JSON" in e.value.message and "line 3: no assistant message" in e.value.message


def test_an_upload_over_the_limit_is_413(root):
    with start(root, "ws-small", max_file_mb=0.001) as url:
        with pytest.raises(openai.APIStatusError) as e:
            upload(client(url), root, "x" * 5000, "big.txt", purpose="user_data")
        assert e.value.status_code == 413


def test_a_bad_file_fails_its_job_naming_the_lines(server, root):
    _, url = server
    c = client(url)
    chat = upload(c, root, conversations(3), "chat.jsonl")
    job = c.fine_tuning.jobs.create(training_file=chat.id, model="gpt-4o-mini",
                                    method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}})
    job = wait(c, job.id)
    assert job.status == "failed" and job.error.param == "training_file"
    assert "line 1:" in job.error.message and "line 3:" in job.error.message
    with pytest.raises(openai.BadRequestError):
        c.fine_tuning.jobs.cancel(job.id)   # a finished job cannot be cancelled


def test_job_requests_are_checked(server):
    _, url = server
    c = client(url)
    with pytest.raises(openai.NotFoundError):
        c.fine_tuning.jobs.create(training_file="file-nope", model="gpt-4o-mini")
    with pytest.raises(openai.NotFoundError):
        c.fine_tuning.jobs.create(training_file="file-nope", model="no-such-model")
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(training_file="file-nope", model="gpt-4o-mini",
                                  hyperparameters={"n_epochs": 0})
    assert e.value.body["param"] == "hyperparameters.n_epochs"


def test_tenants_see_only_their_own(server, root):
    _, url = server
    alice, bob, ops = client(url, "sk-alice"), client(url, "sk-bob"), client(url, "sk-root")
    mine = upload(alice, root, conversations(2), "alice.jsonl")
    assert mine.id not in [f.id for f in bob.files.list()]
    for call in (lambda: bob.files.retrieve(mine.id), lambda: bob.files.content(mine.id),
                 lambda: bob.files.delete(mine.id),
                 lambda: bob.fine_tuning.jobs.create(training_file=mine.id, model="gpt-4o-mini")):
        with pytest.raises(openai.NotFoundError):
            call()
    job = alice.fine_tuning.jobs.create(training_file=mine.id, model="gpt-4o-mini", suffix="alice",
                                        hyperparameters={"n_epochs": 1}, metadata={"team": "support"})
    assert job.id not in [j.id for j in bob.fine_tuning.jobs.list()]
    with pytest.raises(openai.NotFoundError):
        bob.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        bob.fine_tuning.jobs.list_events(job.id)
    with pytest.raises(openai.NotFoundError):
        bob.fine_tuning.jobs.cancel(job.id)
    done = wait(alice, job.id)
    assert done.status == "succeeded" and done.fine_tuned_model.startswith("ft:gpt-4o-mini:alice:")
    assert done.fine_tuned_model not in [m.id for m in bob.models.list()]
    with pytest.raises(openai.NotFoundError):
        bob.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])
    # metadata filter, and the admin key sees every tenant's
    assert [j.id for j in alice.fine_tuning.jobs.list(extra_query={"metadata[team]": "support"})] == [job.id]
    assert alice.fine_tuning.jobs.list(extra_query={"metadata[team]": "sales"}).data == []
    assert ops.fine_tuning.jobs.retrieve(job.id).id == job.id and ops.files.retrieve(mine.id).id == mine.id
    assert done.fine_tuned_model in [m.id for m in ops.models.list()]
    # only an admin loads and unloads models
    with pytest.raises(openai.PermissionDeniedError):
        bob.post("/models/gpt-4o-mini/unload", cast_to=object)
    assert ops.post("/models/gpt-4o-mini/unload", cast_to=object)["loaded"] is False
    assert ops.post("/models/gpt-4o-mini/load", cast_to=object)["loaded"] is True
    # deleting a fine-tuned model: its owner's to do; a served base model cannot be
    with pytest.raises(openai.NotFoundError):
        bob.models.delete(done.fine_tuned_model)
    with pytest.raises(openai.PermissionDeniedError):
        alice.models.delete("gpt-4o-mini")
    assert alice.models.delete(done.fine_tuned_model).deleted
    assert done.fine_tuned_model not in [m.id for m in alice.models.list()]
    with pytest.raises(openai.NotFoundError):
        alice.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])


def long_job(c, root, epochs=50, name="long.jsonl", examples=8, batch=1):
    data = upload(c, root, conversations(examples), name)
    return c.fine_tuning.jobs.create(training_file=data.id, model="gpt-4o-mini",
                                     hyperparameters={"n_epochs": epochs, "batch_size": batch})


def wait_for(cond, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_cancel_and_pause_from_each_state(root):
    with start(root, "ws-pause", max_jobs=1) as url:
        c = client(url)
        running = long_job(c, root, epochs=50)
        wait_for(lambda: c.fine_tuning.jobs.retrieve(running.id).status == "running")
        queued = long_job(c, root, name="queued.jsonl")
        wait_for(lambda: c.fine_tuning.jobs.retrieve(queued.id).status == "queued")
        assert c.fine_tuning.jobs.cancel(queued.id).status == "cancelled"
        # pause a running job: it checkpoints; resume continues from there; cancel a paused one
        wait_for(lambda: any(e.type == "metrics" for e in c.fine_tuning.jobs.list_events(running.id, limit=50)))
        paused = c.fine_tuning.jobs.pause(running.id)
        assert paused.status == "paused"
        step = int(paused_step(c, running.id))
        assert step > 0
        assert c.fine_tuning.jobs.resume(running.id).status == "queued"
        wait_for(lambda: any(f"resumed from step {step}" in e.message
                             for e in c.fine_tuning.jobs.list_events(running.id)))
        with pytest.raises(openai.BadRequestError):
            c.fine_tuning.jobs.resume(running.id)   # only a paused job resumes
        c.fine_tuning.jobs.pause(running.id)
        assert c.fine_tuning.jobs.cancel(running.id).status == "cancelled"
        # cancel a running one, and one still validating its files
        third = long_job(c, root, epochs=50, name="third.jsonl")
        wait_for(lambda: c.fine_tuning.jobs.retrieve(third.id).status == "running")
        assert c.fine_tuning.jobs.cancel(third.id).status == "cancelled"
        fourth = long_job(c, root, name="fourth.jsonl")
        assert c.fine_tuning.jobs.cancel(fourth.id).status == "cancelled"   # validating its files, or queued
        assert not any(e.type == "metrics" for e in c.fine_tuning.jobs.list_events(fourth.id, limit=100))


def paused_step(c, job_id) -> str:
    for e in c.fine_tuning.jobs.list_events(job_id, limit=50):
        if e.message.startswith("Fine-tuning job paused at step"):
            return e.message.rsplit(" ", 1)[1]
    raise AssertionError("no pause event")


def test_a_job_survives_a_server_restart_and_a_killed_worker(root):
    with start(root, "ws-restart") as url:
        c = client(url)
        # one step an epoch, so a checkpoint every step
        job = long_job(c, root, epochs=50, name="restart.jsonl", examples=4, batch=4)
        wait_for(lambda: len(c.fine_tuning.jobs.checkpoints.list(job.id).data) >= 2)
    # the server stopped: its worker checkpointed, and the job waits in the queue
    with start(root, "ws-restart") as url:
        c = client(url)
        assert c.fine_tuning.jobs.retrieve(job.id).status in ("queued", "running")
        wait_for(lambda: any(e.message.startswith("Checkpoint created") for e in
                             c.fine_tuning.jobs.list_events(job.id, limit=1)) and any(
            e.message.startswith("Fine-tuning job resumed") for e in c.fine_tuning.jobs.list_events(job.id, limit=20)))
        os.kill(bg_pid(root, job.id), signal.SIGKILL)   # the new worker, mid-training
        done = wait(c, job.id)
        assert done.status == "succeeded", done.error
        messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=200)]
        assert any("was killed by signal SIGKILL" in m for m in messages)
        assert any(m.startswith("Fine-tuning job resumed from step") for m in messages)
        assert sorted(cp.step_number for cp in c.fine_tuning.jobs.checkpoints.list(job.id, limit=100))[-1] == 50


def bg_pid(root, job_id) -> int:
    import sqlite3

    with sqlite3.connect(root / "ws-restart" / "platform" / "platform.db") as db:
        return db.execute("SELECT pid FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]


def pairs(n: int) -> str:
    rows = [{"input": {"messages": [{"role": "user", "content": f"Where is order {i}?"}]},
             "preferred_output": [{"role": "assistant", "content": f"Order {i} ships today."}],
             "non_preferred_output": [{"role": "assistant", "content": "No idea."}]} for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_dpo_and_full_fine_tuning_with_a_validation_file(server, root):
    _, url = server
    c = client(url, "sk-bob")
    prefs = upload(c, root, pairs(4), "prefs.jsonl")
    dpo = c.fine_tuning.jobs.create(training_file=prefs.id, model="gpt-4o-mini", method={
        "type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2, "batch_size": 2}}})
    train, valid = upload(c, root, conversations(4), "train.jsonl"), upload(c, root, conversations(2, 50), "v.jsonl")
    full = c.fine_tuning.jobs.create(training_file=train.id, validation_file=valid.id, model="gpt-4o-mini",
                                     suffix="full", hyperparameters={"n_epochs": 2, "batch_size": 2},
                                     extra_body={"lora": False})
    dpo, full = wait(c, dpo.id), wait(c, full.id)
    assert dpo.status == "succeeded" and full.status == "succeeded", (dpo.error, full.error)
    assert dpo.method.type == "dpo" and dpo.method.dpo.hyperparameters.beta == 0.2
    assert full.model_extra["lora"] is False
    for job in (dpo, full):
        reply = c.chat.completions.create(model=job.fine_tuned_model, max_tokens=4,
                                          messages=[{"role": "user", "content": "Where is order 1?"}])
        assert reply.choices[0].message.content is not None
    ckpt = c.fine_tuning.jobs.checkpoints.list(full.id).data[0]
    assert ckpt.step_number == 4 and ckpt.metrics.valid_loss is not None
    assert 0 <= ckpt.metrics.valid_mean_token_accuracy <= 1


def test_a_second_server_on_the_workspace_leaves_the_queue_to_the_first(root):
    a, b = start(root, "ws-two"), start(root, "ws-two")
    with a as first, b as second:
        c1, c2 = client(first), client(second)
        one = c1.fine_tuning.jobs.create(training_file=upload(c1, root, conversations(2), "one.jsonl").id,
                                         model="gpt-4o-mini", hyperparameters={"n_epochs": 1})
        two = c2.fine_tuning.jobs.create(training_file=upload(c2, root, conversations(2), "two.jsonl").id,
                                         model="gpt-4o-mini", hyperparameters={"n_epochs": 1})
        assert wait(c2, two.id).status == "succeeded" and wait(c2, one.id).status == "succeeded"
        assert a.app.state.platform.queue.running and not b.app.state.platform.queue.running
