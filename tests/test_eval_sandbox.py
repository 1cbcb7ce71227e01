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


@pytest.mark.parametrize("program", [
    "while True: pass",
    "import time\ntime.sleep(1e9)",
    "import time\nwhile True:\n    try:\n        time.sleep(100)\n    except BaseException:\n        pass",
])
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
    for program in (f"import os\nos.remove({str(victim)!r})", f"open({str(victim)!r}, 'w').write('gone')",
                    f"import shutil\nshutil.rmtree({str(tmp_path)!r})"):
        assert run_untrusted(program).status == "failed", program
    # more ways, tried in one program: each must raise
    attacks = [f"os.unlink({str(victim)!r})", f"os.rename({str(victim)!r}, 'stolen.txt')",
               f"os.replace({str(victim)!r}, 'stolen.txt')", f"os.chmod({str(victim)!r}, 0)",
               f"os.truncate({str(victim)!r}, 0)", f"os.symlink({str(victim)!r}, 'link'); open('link', 'w')",
               f"os.open({str(victim)!r}, os.O_WRONLY | os.O_TRUNC)", f"shutil.move({str(victim)!r}, 'moved')"]
    program = "import os, shutil\nsurvived = []\n"
    for attack in attacks:
        program += f"try:\n    {attack}\n    survived.append({attack!r})\nexcept Exception:\n    pass\n"
    program += "assert not survived, survived\n"
    # inside its own directory the program may do what it likes
    program += "os.mkdir('d')\nopen('d/f', 'w').write('x')\nos.rename('d/f', 'd/g')\nshutil.rmtree('d')\n"
    outcome = run_untrusted(program)
    assert outcome.passed, outcome.detail
    assert victim.read_text() == "keep me" and oct(victim.stat().st_mode)[-3:] != "000"


def test_processes_cannot_be_started(mode):
    # os.fork is refused before any process exists, so the bomb is bounded at zero forks.
    assert run_untrusted("import os\nwhile True: os.fork()").status == "failed"
    attacks = ["import posix; posix.fork()", "os.system('true')", "import subprocess",
               "os.execv('/bin/true', ['true'])", "os.posix_spawn('/bin/true', ['true'], {})",
               "import multiprocessing; multiprocessing.Process(target=print).start()",
               "import pty; pty.fork()", "os.kill(1, 9)", "import ctypes; ctypes.CDLL(None).fork()"]
    program = "import os\nsurvived = []\n"
    for attack in attacks:
        program += f"try:\n    {attack}\n    survived.append({attack!r})\nexcept Exception:\n    pass\n"
    program += "assert not survived, survived\n"
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
    program = ("import os\nassert 'NVLM_SANDBOX_SECRET' not in os.environ, 'leak'\n"
               "assert sorted(os.environ) == ['HOME', 'LANG', 'PATH', 'TMPDIR'], sorted(os.environ)")
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
