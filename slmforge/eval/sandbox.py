"""Running untrusted generated Python (a model's completion and its unit tests) without letting it harm the
machine or the evaluation, and telling a program that passed from one that merely stopped.

Each program runs in its own interpreter (`python -I -S`: no PYTHON* variables, no user or site packages on
the path, only the standard library), in a fresh temporary directory that is removed afterwards, with
a clean environment, in a session of its own so that everything it started dies with it, and it gets
- a wall-clock timeout (the whole process group is killed) and resource limits: CPU seconds, 1 GiB of
  address space, open files, file size, no core dumps, and a process count (which the kernel does not
  apply to root);
- a guard installed before its first line runs: sockets, name lookups, process spawning, signals, fork,
  ctypes and recursive deletion raise PermissionError, and writes, deletes and renames must stay inside its
  directory. The guard stops accidents and naive hostile code, not code that digs the original functions
  back out of the interpreter: that is what the limits, the timeout and the namespaces are for;
- where the machine allows unprivileged namespaces (`unshare --user --net --pid`), no network at all and
  no way to signal a process outside its own namespace. There the program is its namespace's init, so a
  signal it sends itself is ignored; the kernel's (a fault, a limit's SIGKILL) still end it.

A program passes only if it ran to its last line: the child prints a random marker (which the program is
not given) after the program returns, so `sys.exit(0)`, `os._exit(0)` or a killed interpreter before the
checks finish is a failure, not a pass. The rlimits are set by the child interpreter on itself before it
reads the program, not in a `preexec_fn`: that would run between fork and exec in a copy of a parent with
threads (torch's, our worker pool), which Python documents as able to deadlock.

This file is also the child: `python -I -S sandbox.py TIMEOUT MEMORY` runs `program.py` of its working
directory, so it imports nothing outside the standard library.
"""

from __future__ import annotations

import functools
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

MEMORY = 1 << 30  # bytes of address space
FILE_SIZE = 16 << 20  # bytes per file written, its captured output included
OPEN_FILES = 64
PROCESSES = 64  # counts every process and thread of the user; root is exempt
NAMESPACES = ["unshare", "--user", "--net", "--pid", "--fork", "--kill-child"]


@dataclass(frozen=True)
class Outcome:
    passed: bool
    status: str  # "passed"; "failed": it ended on its own before its last line (an exception, an exit);
    # "timeout": killed at the wall-clock limit; "error": killed by a signal (a resource limit, a crash)
    message: str = ""


def run_program(source: str, timeout: float = 3.0, memory: int = MEMORY, isolate: bool = True) -> Outcome:
    """Run one program to its end or to `timeout` seconds. `isolate=False` leaves out the namespaces, so
    that the guard and the limits can be shown to hold alone."""
    folder = tempfile.mkdtemp(prefix="slmforge-sandbox-")
    try:
        with open(os.path.join(folder, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        marker = secrets.token_hex(16)
        prefix = _namespaces() if isolate else []
        env = {"PATH": os.defpath, "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8"}
        with open(os.path.join(folder, "stdout"), "wb") as out, open(os.path.join(folder, "stderr"), "wb") as err:
            child = subprocess.Popen([*prefix, sys.executable, "-I", "-S", os.path.abspath(__file__), str(timeout),
                                      str(memory)], cwd=folder, env=env, stdin=subprocess.PIPE, stdout=out,
                                     stderr=err, start_new_session=True)
            try:
                child.communicate(marker.encode() + b"\n", timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(child.pid)
                child.wait()
        if timed_out:
            return Outcome(False, "timeout", f"still running after {timeout:g} s")
        if child.returncode == 0 and _tail(os.path.join(folder, "stdout"), 64).endswith(marker.encode() + b"\n"):
            return Outcome(True, "passed")
        if child.returncode < 0:
            return Outcome(False, "error", f"killed by {signal.Signals(-child.returncode).name}")
        lines = _tail(os.path.join(folder, "stderr"), 2048).decode(errors="replace").strip().splitlines()
        return Outcome(False, "failed", lines[-1] if lines else f"exit status {child.returncode} before its end")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_programs(sources: list[str], timeout: float = 3.0, workers: int = 2, memory: int = MEMORY,
                 isolate: bool = True) -> list[Outcome]:
    """Run programs `workers` at a time (each in its own process); outcomes in the order of `sources`."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda source: run_program(source, timeout, memory, isolate), sources))


@functools.cache
def _namespaces() -> list[str]:
    """The `unshare` command to run under, or nothing where the machine refuses unprivileged namespaces
    (no util-linux, user namespaces switched off, some containers); asked once per process."""
    if shutil.which("unshare") is None:
        return []
    try:
        works = subprocess.run([*NAMESPACES, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        works = False
    return NAMESPACES if works else []


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(path: str, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - size))
        return f.read()


# ---- the child: everything below runs inside the sandboxed interpreter ----

DENIED = {
    "os": ["system", "popen", "fork", "forkpty", "kill", "killpg", "setsid", "setpgid", "setpgrp", "chdir",
           "fchdir", "chroot", "link", "symlink", "execl", "execle", "execlp", "execlpe", "execv", "execve",
           "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp",
           "spawnvpe", "posix_spawn", "posix_spawnp", "fchmod", "fchown", "pidfd_open"],
    "signal": ["pthread_kill", "pidfd_send_signal"],
    "subprocess": ["Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"],
    "_posixsubprocess": ["fork_exec"],
    "shutil": ["rmtree", "move", "chown"],
    "socket": ["socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
               "gethostbyname", "gethostbyname_ex", "gethostbyaddr"],
    "_socket": ["socket", "SocketType", "socketpair", "getaddrinfo", "gethostbyname", "gethostbyname_ex",
                "gethostbyaddr"],
}
# os functions whose path arguments (by position) must lie inside the program's directory
CONFINED = {"remove": 1, "unlink": 1, "rmdir": 1, "mkdir": 1, "mkfifo": 1, "mknod": 1, "chmod": 1, "chown": 1,
            "lchown": 1, "truncate": 1, "utime": 1, "setxattr": 1, "removexattr": 1, "rename": 2, "replace": 2}
BLOCKED_IMPORTS = ["ctypes", "_ctypes", "cffi"]
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
TMPFILE = getattr(os, "O_TMPFILE", 0)  # Linux only; includes O_DIRECTORY's bit


def _denied(name: str):
    def deny(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")
    return deny


def _install_guard(root: str) -> None:
    """Disable what can reach other processes, the network or files outside `root` (see the module's
    docstring for what this does not stop)."""
    import builtins
    import importlib
    import io
    import posix
    import _io

    for name in DENIED:
        module = importlib.import_module(name)
        for attr in DENIED[name]:
            if hasattr(module, attr):
                setattr(module, attr, _denied(f"{name}.{attr}"))
    for name in [n for n in DENIED["os"] if hasattr(posix, n)]:
        setattr(posix, name, getattr(os, name))  # os.fork is posix.fork: close the second door too
    for name in BLOCKED_IMPORTS:
        sys.modules[name] = None  # `import ctypes` now raises ImportError

    realpath, original_open, original_os_open = os.path.realpath, builtins.open, os.open

    def check(path, what: str, root_itself: bool = False) -> None:
        if isinstance(path, int):  # a descriptor already opened (and checked)
            return
        real = realpath(os.fsdecode(os.fspath(path)))
        if not (real.startswith(root + os.sep) or root_itself and real == root):
            raise PermissionError(f"{what} outside the sandbox's directory: {path!r}")

    def confined(name: str, n_paths: int):
        function = getattr(os, name)

        def call(*args, **kwargs):
            if any(kwargs.get(k) is not None for k in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
                raise PermissionError(f"os.{name} with dir_fd is disabled in the sandbox")
            for path in list(args[:n_paths]) + [kwargs[k] for k in ("path", "src", "dst") if k in kwargs]:
                check(path, f"os.{name}")
            return function(*args, **kwargs)
        return call

    for name, n_paths in CONFINED.items():
        if hasattr(os, name):
            setattr(os, name, confined(name, n_paths))
            setattr(posix, name, getattr(os, name))

    def writes(mode) -> bool:
        return isinstance(mode, str) and any(c in mode for c in "wax+")

    def guarded_open(file, mode="r", *args, **kwargs):
        opener = args[5] if len(args) > 5 else kwargs.get("opener")
        if writes(mode) and opener is None:  # an opener opens through the guarded os.open
            check(file, "writing")
        return original_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & WRITE_FLAGS:
            if kwargs.get("dir_fd") is not None:
                raise PermissionError("os.open for writing with dir_fd is disabled in the sandbox")
            # O_TMPFILE names the directory to hold an unnamed file (tempfile.TemporaryFile)
            check(path, "writing", root_itself=TMPFILE != 0 and flags & TMPFILE == TMPFILE)
        return original_os_open(path, flags, *args, **kwargs)

    class GuardedFileIO(_io.FileIO):
        def __init__(self, file, mode="r", *args, **kwargs):
            if writes(mode):
                check(file, "writing")
            super().__init__(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = guarded_open
    os.open = posix.open = guarded_os_open
    io.FileIO = _io.FileIO = GuardedFileIO


def _child_main() -> None:
    """Limit this interpreter, read the marker (stdin) and the program, guard, run it, and print the
    marker only if it returned."""
    import resource
    import traceback

    timeout, memory = float(sys.argv[1]), int(sys.argv[2])
    limits = [(resource.RLIMIT_CPU, math.ceil(timeout) + 1), (resource.RLIMIT_AS, memory),
              (resource.RLIMIT_FSIZE, FILE_SIZE), (resource.RLIMIT_NOFILE, OPEN_FILES),
              (resource.RLIMIT_NPROC, PROCESSES), (resource.RLIMIT_CORE, 0)]
    for limit, value in limits:
        hard = resource.getrlimit(limit)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(limit, (value, value))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past FILE_SIZE raises OSError instead of killing
    marker = sys.stdin.readline().strip()
    with open("program.py", encoding="utf-8") as f:
        source = f.read()
    write, exit_now = os.write, os._exit
    _install_guard(os.path.realpath(os.getcwd()))
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException:  # noqa: BLE001 - SystemExit too: a program that exits early did not pass
        traceback.print_exc()
        sys.stderr.flush()
        exit_now(1)
    sys.stdout.flush()
    write(1, marker.encode() + b"\n")
    exit_now(0)  # not sys.exit: atexit handlers or threads the program left must not run on


if __name__ == "__main__":
    _child_main()
