"""The sandbox survives hostile programs, and nothing outside it is harmed."""
import os
import socket
import threading
import time

import pytest

from fmkit.evals.sandbox import Limits, check_program, run_code, run_many

FAST = Limits(timeout=3, cpu_seconds=2, memory_mb=256, file_mb=2, processes=4, output_kb=16)


@pytest.fixture
def sentinel(tmp_path):
    f = tmp_path / "precious.txt"
    f.write_text("keep me")
    os.chmod(tmp_path, 0o755)
    return f


def ok(r):
    """The harness got a result back in reasonable time."""
    assert r.seconds < FAST.timeout + 3
    return r


def test_normal_programs():
    assert run_code("print(sum(range(10)))").stdout == "45\n"
    r = run_code("assert sorted([3, 1]) == [1, 3, 2]")
    assert r.status == "failed" and r.reason == "AssertionError"
    r = run_code("def f(:\n  pass")
    assert r.status == "failed" and r.reason == "SyntaxError"
    assert run_code("import sys\nprint(sys.stdin.read().upper())", stdin="abc").stdout == "ABC\n"
    assert check_program("def add(a, b):\n    return a + b\n\ndef check(f):\n    assert f(2, 3) == 5\n\ncheck(add)")\
        .status == "passed"


HOSTILE = {
    "fork_bomb": "import os\nwhile True:\n    os.fork()",
    "multiprocessing_bomb": "import multiprocessing as mp\nps = []\nwhile True:\n"
                            "    p = mp.Process(target=lambda: None); p.start(); ps.append(p)",
    "subprocess_bomb": "import subprocess, sys\nps = [subprocess.Popen([sys.executable, '-c', 'import time; "
                       "time.sleep(60)']) for _ in range(200)]",
    "memory_bomb_list": "x = [0] * (10 ** 10)",
    "memory_bomb_bytes": "b = bytearray(10 ** 11)",
    "memory_grow": "xs = []\nwhile True:\n    xs.append(' ' * 10 ** 7)",
    "infinite_loop": "while True:\n    pass",
    "cpu_spin_threads": "import threading\ndef spin():\n    while True: pass\n"
                        "for _ in range(3): threading.Thread(target=spin).start()\nspin()",
    "deep_recursion": "import sys\nsys.setrecursionlimit(10 ** 6)\ndef f(n): return f(n + 1)\nf(0)",
    "ignore_sigterm": "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: pass",
    "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
    "kill_all": "import os, signal\nos.kill(-1, signal.SIGKILL)",
    "killpg_parent": "import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
    "huge_stdout": "while True:\n    print('x' * 1000)",
    "huge_file": "with open('big.bin', 'wb') as f:\n    while True: f.write(b'0' * 10 ** 6)",
    "close_stdout": "import os\nos.close(1)\nos.close(2)\nwhile True: pass",
    "many_threads": "import threading, time\nts = [threading.Thread(target=time.sleep, args=(30,)) for _ in range(500)]\n"
                    "[t.start() for t in ts]",
    "daemon_escape": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                     "        time.sleep(120)\n    os._exit(0)\ntime.sleep(0.2)",
    "exit_early_zero_is_still_checked": "import sys\nsys.exit(3)",
    "ctypes_abort": "import ctypes\nctypes.string_at(0)",
    "os_system": "import os\nos.system('sleep 60')",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_programs_are_contained(name):
    r = ok(run_code(HOSTILE[name], FAST))      # the harness is alive to see this
    if name in MUST_FAIL:
        assert r.status != "passed", r
    assert len(r.stdout) < 20_000 and len(r.stderr) < 20_000


MUST_FAIL = {"fork_bomb", "memory_bomb_list", "memory_bomb_bytes", "memory_grow", "infinite_loop", "cpu_spin_threads",
             "deep_recursion", "ignore_sigterm", "huge_stdout", "huge_file", "close_stdout",
             "exit_early_zero_is_still_checked", "ctypes_abort", "kill_parent", "killpg_parent"}


def test_limits_hit_are_named():
    r = run_code(HOSTILE["infinite_loop"], Limits(timeout=1.5, cpu_seconds=10))
    assert r.status == "timeout" and r.reason == "wall-clock timeout after 1.5 s"
    r = run_code("x = bytearray(10 ** 10)", FAST)
    assert r.status == "failed" and r.reason == "MemoryError"
    r = run_code("while True: pass", Limits(timeout=10, cpu_seconds=1))
    assert r.status == "killed" and "CPU" in r.reason and r.seconds < 5
    r = run_code(HOSTILE["huge_stdout"], FAST)
    assert r.stdout.endswith("[output truncated]")


def test_files_outside_are_safe(sentinel):
    code = (f"import os, shutil\n"
            f"for f in (lambda: os.remove({str(sentinel)!r}), lambda: shutil.rmtree({str(sentinel.parent)!r}),\n"
            f"          lambda: open({str(sentinel)!r}, 'w').write('gone'),\n"
            f"          lambda: open({str(sentinel.parent / 'new.txt')!r}, 'w').write('x')):\n"
            f"    try: f()\n    except OSError as e: print(type(e).__name__)\n")
    r = run_code(code, FAST)
    assert sentinel.read_text() == "keep me" and not (sentinel.parent / "new.txt").exists()
    assert r.stdout.count("PermissionError") == 4 or os.geteuid() != 0


def test_cannot_write_project_files():
    target = os.path.abspath(__file__)
    before = open(target).read()
    run_code(f"open({target!r}, 'a').write('# pwned')", FAST)
    assert open(target).read() == before


def test_no_network_reaches_a_local_server():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    seen = []

    def accept():
        end = time.time() + 4
        while time.time() < end:
            try:
                seen.append(server.accept())
            except OSError:
                pass
    t = threading.Thread(target=accept)
    t.start()
    codes = [f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
             f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))",
             f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))",
             f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)"]
    results = [run_code(c, FAST) for c in codes]
    t.join()
    server.close()
    assert seen == []
    assert all(r.status == "failed" for r in results)


def test_environment_secrets_are_not_visible(monkeypatch):
    monkeypatch.setenv("FMKIT_TEST_SECRET", "s3cr3t")
    r = run_code("import os\nprint(dict(os.environ))\n"
                 "try:\n    print(open(f'/proc/{os.getppid()}/environ', 'rb').read())\n"
                 "except OSError as e:\n    print('denied', type(e).__name__)", FAST)
    assert "s3cr3t" not in r.stdout and "s3cr3t" not in r.stderr


def test_no_leftover_processes():
    before = set(os.listdir("/proc"))
    run_code(HOSTILE["daemon_escape"], FAST)
    run_code("import subprocess\nsubprocess.Popen(['sleep', '60'])", FAST)
    time.sleep(0.3)
    leftover = []
    for pid in set(os.listdir("/proc")) - before:
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"sleep" in cmd or b"time.sleep" in cmd:
            leftover.append(cmd)
    assert leftover == []


def test_run_many_keeps_order():
    progs = [f"import time\ntime.sleep({0.3 if i % 2 else 0})\nprint({i})" for i in range(6)]
    assert [r.stdout.strip() for r in run_many(progs, FAST, workers=3)] == [str(i) for i in range(6)]
