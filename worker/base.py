"""The shared base zygote: one fresh interpreter per runtime profile that forks skills' zygotes.

Exec'ing a fresh interpreter and importing the worker runtime costs tens of milliseconds; a
fork of an interpreter that already did it costs about one. So the supervisor starts this
process once per runtime profile (`python -I -B -m worker.base FD`, the same interpreter,
flags, scrubbed environment, cwd and user as an exec'd zygote), and each skill's zygote is a
fork of it that then boots exactly as an exec'd one does (`worker.zygote.run_forked`): reads
its config, imports the skill's preloads, compiles its entrypoint, applies its layers.

What the base holds, and why that is safe to hand to every skill: the interpreter, the worker
runtime (`worker.*`, msgspec) and a few stdlib modules, imported and never run against any
skill; its own control socket; nothing else. It receives from the supervisor one fixed byte and
one fd per fork (the new zygote's end of a socketpair the supervisor made), closes the fd in
itself straight after the fork, and never sees a skill's config, code, input or output: those
travel on the zygote's own socket after the fork. So a zygote forked from it inherits nothing of
another skill: not an fd (the child closes all but its own socket and 0-2), not a byte of
memory (the base never had one), not a layer (the base applies none; each zygote applies its
own, unshares its own namespaces, as an exec'd zygote does).

Ancestry: the fork uses `CLONE_PARENT` (`worker.pidns.fork_sibling`), so a zygote is the
supervisor's child, not the base's: the supervisor waits for it and kills it as it does an
exec'd one, and a base killed from outside takes no zygote with it and leaves no orphan. The
base has no child and reaps nothing; it exits on EOF of its control socket (the supervisor's
close or death).
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys

import msgspec

from worker import isolation, pidns, zygote
from worker.protocol import EXIT_BOOT_FAILED, BaseForked, BaseReady

#: `ps` name of the base (its forks take the interpreter's own name back).
BASE_NAME = b"sbx-base"
#: The one request: fork a zygote whose control socket travels beside it.
FORK = b"F"
#: Stdlib modules most skills import, preloaded so a cold zygote finds them imported (trusted:
#: the standard library; imported before any skill exists, so their state holds nothing of one).
COMMON_MODULES = ("json", "re", "collections", "dataclasses", "datetime", "typing", "math",
                  "importlib", "traceback", "decimal")


def _become_zygote(control: socket.socket, fd: int, name: bytes) -> None:
    """In the forked child: shed the base, then boot and serve as the skill's zygote."""
    code = 0
    try:
        control.detach()  # closed below with the rest; never through this object
        os.setsid()  # its own session, as an exec'd zygote started with start_new_session
        isolation.close_fds_except({0, 1, 2, fd})  # the base's socket never reaches a skill
        isolation.set_process_name(name)
        sys.argv = sys.argv[:1]
        zygote.run_forked(socket.socket(fileno=fd))
    except SystemExit as exc:  # SIGTERM's handler, after the zygote's shutdown ran
        code = exc.code if isinstance(exc.code, int) else 0
    except BaseException:  # noqa: BLE001 - nothing may return into the base's loop
        code = EXIT_BOOT_FAILED
    os._exit(code)


def serve(control: socket.socket) -> None:
    """Fork a zygote per request until the control socket reaches EOF."""
    encoder = msgspec.msgpack.Encoder()
    with open("/proc/self/comm", "rb") as comm:
        name = comm.read().strip() or b"python"
    isolation.set_process_name(BASE_NAME)
    gc.collect()
    gc.freeze()  # shared copy-on-write with every zygote: keep the collector off these pages
    control.send(encoder.encode(BaseReady(pid=os.getpid())))
    while True:
        try:
            message, fds, _flags, _addr = socket.recv_fds(control, 16, 1)
        except OSError:
            return
        if not message:
            return
        if message != FORK or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            control.send(encoder.encode(BaseForked(pid=0, error="malformed request")))
            continue
        try:
            pid = pidns.fork_sibling()
        except OSError as exc:
            os.close(fds[0])
            control.send(encoder.encode(BaseForked(pid=0, error=str(exc))))
            continue
        if pid == 0:
            _become_zygote(control, fds[0], name)
        os.close(fds[0])
        control.send(encoder.encode(BaseForked(pid=pid)))


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    import importlib

    for module in COMMON_MODULES:
        importlib.import_module(module)
    isolation.remember_code_paths()
    problem = pidns.unavailable()
    control = socket.socket(fileno=int(sys.argv[1]))
    if problem:
        control.send(msgspec.msgpack.encode(BaseForked(pid=0, error=problem)))
        os._exit(EXIT_BOOT_FAILED)
    serve(control)


if __name__ == "__main__":
    main()
