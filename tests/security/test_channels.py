"""Ordinary calls that would be channels between executions, or handles on processes outside
the execution: each is tried from a skill, and the same code is shown to work on the host.

- page cache: evicting pages of a file every execution reads (`posix_fadvise(DONTNEED)`) and
  reading only what is cached (`preadv2(RWF_NOWAIT)`) make its state a writable, readable bit;
- `flock` on a read-only file any execution may open;
- inotify / dnotify on shared directories (who imports what, when);
- `clone(CLONE_PARENT)`: a process that is the zygote's child, outside the execution's tree;
- `prlimit` on another process.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from sandbox import ExecutionStatus
from tests.security.hostile import Hostile, requires

pytestmark = requires("seccomp")

_PROBES = {
    "flock": """
        import fcntl
        with open(PATH, "rb") as shared:
            fcntl.flock(shared, fcntl.LOCK_EX | fcntl.LOCK_NB)
    """,
    "inotify": """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.inotify_init1(0) < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
    """,
    "dnotify": """
        import fcntl
        fd = os.open(os.path.dirname(PATH), os.O_RDONLY)
        fcntl.fcntl(fd, fcntl.F_NOTIFY, fcntl.DN_ACCESS)
    """,
    "preadv2 RWF_NOWAIT": """
        fd = os.open(PATH, os.O_RDONLY)
        os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
    """,
    "clone CLONE_PARENT": """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        pid = libc.syscall(56, 0x00008000 | 17, 0, 0, 0, 0)  # CLONE_PARENT | SIGCHLD
        if pid == 0:
            os._exit(0)
        if pid < 0:
            raise OSError(ctypes.get_errno(), "clone(CLONE_PARENT)")
    """,
    "prlimit of another process": """
        import resource, time
        child = os.fork()
        if child == 0:
            time.sleep(5)
            os._exit(0)
        try:
            resource.prlimit(child, resource.RLIMIT_NOFILE, (3, 3))
        finally:
            os.kill(child, 9)
            os.waitpid(child, 0)
    """,
}


def _skill(shared_file: str, probe: str) -> str:
    """`attack` runs `probe` with PATH naming `shared_file` in the skill's own directory."""
    return (f"PATH = os.path.join(os.path.dirname(__file__), {shared_file!r})\n\n"
            "def attack(input):\n" + textwrap.indent(textwrap.dedent(probe), "    ")
            + "    return 'done'\n")


def _run_on_host(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30)


@pytest.mark.parametrize("name", list(_PROBES))
def test_a_channel_call_works_on_the_host_and_is_refused_in_a_skill(
        hostile: Callable[..., Hostile], tmp_path: Path, name: str) -> None:
    attack = hostile(_skill("main.py", _PROBES[name]))
    shared = os.path.join(str(attack.skill.path), "main.py")
    probe = f"import os\nPATH = {shared!r}\n" + textwrap.dedent(_PROBES[name])
    with open(shared, "rb") as warm:  # cached, so RWF_NOWAIT has something to read
        warm.read()
    host = _run_on_host(probe)
    if name == "preadv2 RWF_NOWAIT" and "Operation not supported" in host.stderr:
        # Linux 6.1's tmpfs (the VM stage's /tmp) has no RWF_NOWAIT reads: no channel to refuse.
        pytest.skip(f"preadv2(RWF_NOWAIT) is not supported on {_filesystem(shared)} under "
                    f"Linux {os.uname().release}: the channel does not exist here")
    assert host.returncode == 0, host.stderr  # control: the call works outside the sandbox
    result = attack.run()
    assert result.status is ExecutionStatus.FAILED, result
    assert "Error" in result.error, result.error
    attack.assert_still_serving()


def _filesystem(path: str) -> str:
    """The type of the file system `path` is on (the longest mount point above it)."""
    best, kind = "", "unknown"
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            _, point, fstype, *_ = line.split()
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(
                    best):
                best, kind = point, fstype
    return kind


def _resident_pages(path: str) -> int:
    """Pages of `path` in the page cache (mincore over a mapping of it; the test is root)."""
    size = os.path.getsize(path)
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            vector = (ctypes.c_ubyte * pages)()
            if libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return sum(byte & 1 for byte in vector)
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)


_EVICT = """
    import os
    fd = os.open(PATH, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
"""


def test_a_skill_cannot_evict_shared_files_from_the_page_cache(
        hostile: Callable[..., Hostile]) -> None:
    attack = hostile(_skill("data.bin", _EVICT))
    shared = os.path.join(str(attack.skill.path), "data.bin")
    with open(shared, "wb") as data:
        data.write(os.urandom(64 * 4096))
        data.flush()
        os.fsync(data.fileno())  # clean pages: dirty ones are never dropped
    os.chmod(shared, 0o644)

    def warm() -> int:
        with open(shared, "rb") as data:
            data.read()
        return _resident_pages(shared)

    assert warm() == 64
    host = _run_on_host(f"PATH = {shared!r}\n" + textwrap.dedent(_EVICT))
    assert host.returncode == 0, host.stderr
    # Margins, not exact counts: reclaim elsewhere on the host may drop a page or two.
    if _resident_pages(shared) >= 8 and _filesystem(shared) in ("tmpfs", "overlay"):
        # Where the control itself cannot evict, there is no channel to close: tmpfs pages are
        # the file itself, and an overlay with a tmpfs upper layer (the VM stage's /tmp) keeps
        # them so too. On any other file system a control that evicts nothing is a failure.
        pytest.skip(f"fadvise(DONTNEED) evicts nothing on this file system "
                    f"({_filesystem(shared)}, {_resident_pages(shared)} of 64 pages stayed "
                    f"after the control): the channel does not exist here")
    assert _resident_pages(shared) < 8  # control: on the host the advice evicts the file
    assert warm() == 64
    result = attack.run()
    assert result.ok, result  # advice may be ignored: the call succeeds...
    assert _resident_pages(shared) > 56  # ...and evicts nothing
