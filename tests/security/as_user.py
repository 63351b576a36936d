"""Run a Python script as an ordinary user on a host where the tests run as root.

`python tests/security/as_user.py UID SCRIPT [ARGS...]`, started as root: in a mount namespace
of its own, the interpreter, the project and the script's directory are exposed read-only to
any uid (the interpreter may sit under a 0700 home, as pyenv's does under /root), then the
process becomes UID (no groups, no capabilities, RLIMIT_NPROC as an outside cap on that uid)
and runs SCRIPT with the same interpreter. On a cgroup v2 host it first delegates a cgroup to
that uid, as systemd does for a user's session, and removes it afterwards. The script then is
a supervisor as an application would run one: `Sandbox` without root, detecting and using what
an ordinary user may have.
"""

from __future__ import annotations

import os
import resource
import sys

#: A uid used by nothing else, so RLIMIT_NPROC counts only the script's processes: the cap a
#: careless test cannot exceed, whatever the sandbox under test does.
OUTSIDE_TASK_CAP = 400


def main() -> None:
    uid, script, *args = sys.argv[1:]
    project = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, project)
    from worker import namespaces

    paths = sorted({os.path.realpath(path) for path in (
        sys.base_prefix, sys.prefix, project, os.path.dirname(os.path.abspath(script)))})
    namespaces.enter_mount_namespace()
    namespaces.expose(paths)
    namespaces.check_reachable(paths, paths)
    delegated = _delegate_cgroup(int(uid))
    pid = os.fork()
    if pid == 0:
        resource.setrlimit(resource.RLIMIT_NPROC, (OUTSIDE_TASK_CAP, OUTSIDE_TASK_CAP))
        os.setgroups([])
        os.setresgid(int(uid), int(uid), int(uid))
        os.setresuid(int(uid), int(uid), int(uid))
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": project, "HOME": "/tmp",
               "PYTHONDONTWRITEBYTECODE": "1"}
        os.execve(sys.executable, [sys.executable, script, *args], env)
    _, status = os.waitpid(pid, 0)
    if delegated:
        _remove_tree(delegated)
    sys.exit(os.waitstatus_to_exitcode(status))


_V2 = "/sys/fs/cgroup"


def _delegate_cgroup(uid: int) -> str:
    """On a cgroup v2 host, what systemd does for an ordinary user's session (`Delegate=yes`):
    a cgroup of its own, owned by the user (the directory and its cgroup.procs,
    cgroup.subtree_control and cgroup.threads), with memory, pids and cpu available in it; this
    process moves into it. Returns its path, or "" where there is no v2 hierarchy to delegate
    (cgroup v1) or its parent holds processes and so cannot hand controllers down."""
    if not os.path.exists(os.path.join(_V2, "cgroup.controllers")):
        return ""
    with open("/proc/self/cgroup") as membership:
        own = next((line.strip()[3:] for line in membership if line.startswith("0::")), "")
    parent = os.path.join(_V2, own.lstrip("/"))
    try:
        with open(os.path.join(parent, "cgroup.subtree_control"), "w") as control:
            control.write("+memory +pids +cpu")
        delegated = os.path.join(parent, f"test-user-{uid}-{os.getpid()}")
        os.mkdir(delegated)
    except OSError as exc:
        print(f"as_user: no cgroup delegated ({exc})", file=sys.stderr)
        return ""
    for name in ("", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
        os.chown(os.path.join(delegated, name), uid, uid)
    with open(os.path.join(delegated, "cgroup.procs"), "w") as procs:
        procs.write(str(os.getpid()))
    return delegated


def _remove_tree(directory: str) -> None:
    """Remove a cgroup and what the user made below it, deepest first (once emptied)."""
    with open(os.path.join(os.path.dirname(directory), "cgroup.procs"), "w") as procs:
        procs.write(str(os.getpid()))  # out of it, so it can go
    for root, _dirs, _files in sorted(os.walk(directory), key=lambda entry: -len(entry[0])):
        try:
            os.rmdir(root)
        except OSError as exc:
            print(f"as_user: {root} not removed: {exc}", file=sys.stderr)


if __name__ == "__main__":
    main()
