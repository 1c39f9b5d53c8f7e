"""`fmkit chat`: a real pseudo-terminal session (streaming, Ctrl-C stops a reply not the session, /reset, /save),
piped JSONL in and out, and streamed pieces that add up to the completion."""
import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest

from fmkit.conversation import Chat
from fmkit.models.generate import Generator, IncrementalText


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_dir):
    from conftest import save_fmkit_llama

    return save_fmkit_llama(tokenizer_dir, tmp_path_factory.mktemp("chat") / "model", 4096)


class Terminal:
    """`fmkit chat` on a real pseudo-terminal: it is the child's controlling tty, so ^C is a SIGINT from the line
    discipline, as when a person presses it."""

    def __init__(self, args, env):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execvpe(sys.executable, [sys.executable, "-m", "fmkit", *args], env)
        self.seen = b""

    def read_until(self, marker: bytes, timeout: float = 60.0) -> bytes:
        end = time.time() + timeout
        while marker not in self.seen:
            left = end - time.time()
            assert left > 0, f"no {marker!r} after {timeout} s; screen so far: {self.seen[-2000:]!r}"
            if select.select([self.fd], [], [], min(left, 1.0))[0]:
                try:
                    self.seen += os.read(self.fd, 4096)
                except OSError:   # the child closed the terminal
                    break
        assert marker in self.seen, self.seen[-2000:]
        at = self.seen.index(marker) + len(marker)
        out, self.seen = self.seen[:at], self.seen[at:]
        return out

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 30.0) -> int:
        end = time.time() + timeout
        while time.time() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    os.read(self.fd, 4096)   # drain, so the child never blocks writing to the terminal
                except OSError:
                    pass
        os.kill(self.pid, 9)
        raise AssertionError("fmkit chat did not exit")


def test_terminal_session_streams_survives_ctrl_c_resets_and_saves(tmp_path, model):
    env = {**os.environ, "FMKIT_QUIET": "1", "TERM": "dumb"}
    saved = tmp_path / "talk.jsonl"
    # greedy decoding of this random model never writes EOS, so the first reply runs until ^C stops it
    term = Terminal(["chat", str(model), "--temperature", "0", "--max-new-tokens", "3000", "--system", "Be brief."],
                    env)
    term.read_until(b"you> ")
    term.send("hello there\r")
    term.read_until(b"model> ")
    term.read_until(b"\r\n\r\n\r\n")   # streamed: text arrives while the reply is still being written
    term.send("\x03")
    term.read_until(b"[stopped]")
    term.read_until(b"you> ")       # the session goes on
    term.send("/save " + str(saved) + "\r")
    term.read_until(b"saved to")
    term.read_until(b"you> ")
    term.send("/reset\r")
    term.read_until(b"conversation cleared")
    term.read_until(b"you> ")
    term.send("/nonsense\r")
    term.read_until(b"/reset starts over")
    term.read_until(b"you> ")
    term.send("/exit\r")
    assert term.wait() == 0
    rows = [json.loads(line) for line in saved.read_text().splitlines()]
    assert len(rows) == 1
    msgs = rows[0]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[0]["content"] == "Be brief." and msgs[1]["content"] == "hello there"


def test_ctrl_c_at_the_prompt_and_ctrl_d_leave_cleanly(model):
    term = Terminal(["chat", str(model)], {**os.environ, "FMKIT_QUIET": "1", "TERM": "dumb"})
    term.read_until(b"you> ")
    # as a person would, a moment after the prompt: a SIGINT that lands while readline is still setting up the
    # line (before it waits for a key) is only acted on at the next key, in any Python program using readline
    time.sleep(0.5)
    term.send("\x03")
    term.read_until(b"Ctrl-D or /exit")
    term.read_until(b"you> ")   # keys typed before the prompt is back reach readline mangled, as for a person
    term.send("\x04")
    assert term.wait() == 0


def test_piped_jsonl_gets_one_line_per_conversation_in_order(tmp_path, model):
    lines = [json.dumps({"messages": [{"role": "user", "content": "Hi."}]}), "not json",
             json.dumps({"messages": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
                                      {"role": "user", "content": "C"}]}),
             json.dumps({"messages": [{"role": "assistant", "content": "no user turn"}]}),
             json.dumps({"messages": [{"role": "robot", "content": "x"}]})]
    out = subprocess.run([sys.executable, "-m", "fmkit", "chat", str(model), "--max-new-tokens", "8",
                          "--system", "S."], input="\n".join(lines) + "\n", capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 5
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant"]
    assert rows[1] == {"line": 2, "error": rows[1]["error"]} and "not valid JSON" in rows[1]["error"]
    assert [m["content"] for m in rows[2]["messages"][:4]] == ["S.", "A", "B", "C"]
    assert rows[3]["line"] == 4 and "last message must be the user's" in rows[3]["error"]
    assert rows[4]["line"] == 5 and "messages[0] needs a role" in rows[4]["error"]
    assert "3 of 5 lines not answered" in out.stderr


def test_history_is_kept_and_rendered_in_the_models_template(model):
    c = Chat(model, system="Be brief.", max_new_tokens=5, temperature=0)
    c.say("first")
    c.say("second")
    assert [m["role"] for m in c.messages] == ["system", "user", "assistant", "user", "assistant"]
    prompt = c._prompt(c.messages + [{"role": "user", "content": "third"}])
    assert prompt.startswith("<|system|>\nBe brief.\n<|user|>\nfirst\n") and prompt.endswith("<|assistant|>\n")
    c.reset()
    assert c.messages == [{"role": "system", "content": "Be brief."}]


def test_streamed_pieces_add_up_to_the_completion(model):
    gen = Generator(model, "fp32")
    pieces: dict[int, list[str]] = {0: [], 1: []}
    done = gen(["def ", "\u00e9t\u00e9 \u4e2d\u6587 "], 40, temperature=1.0, seed=3, stop=["zz"],
               on_text=lambda row, p: pieces[row].append(p))
    for row, c in enumerate(done):
        assert "".join(pieces[row]) == c.text


def test_incremental_text_equals_a_whole_decode(model):
    tok = Generator(model, "fp32").tok
    ids = tok("caf\u00e9 \u2603 na\u00efve \u4e2d\u6587 text  with  spaces\n\tand tabs", add_special_tokens=False)[
        "input_ids"]
    inc = IncrementalText(tok)
    for n in range(1, len(ids) + 1):
        text = inc.add(ids[:n])
        assert tok.decode(ids[:n]).startswith(text)
    assert text == tok.decode(ids)


def test_a_model_without_a_template_is_refused_with_choices_chat_takes(tmp_path, tokenizer_dir):
    from conftest import save_tiny_llama

    from fmkit.errors import FmkitError

    folder = save_tiny_llama(tokenizer_dir, tmp_path / "plain", 128)   # not built by fmkit: no template given
    with pytest.raises(FmkitError, match="has no chat template") as err:
        Chat(folder, dtype="fp32")
    assert "--template fmkit" in str(err.value) and "none" not in str(err.value)
    assert Chat(folder, dtype="fp32", template="fmkit").template == "fmkit"
