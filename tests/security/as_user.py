"""Run a Python script as an ordinary user on a host where the tests run as root.

`python tests/security/as_user.py UID SCRIPT [ARGS...]`, started as root: in a mount namespace
of its own, the interpreter, the project and the script's directory are exposed read-only to
any uid (the interpreter may sit under a 0700 home, as pyenv's does under /root), then the
process becomes UID (no groups, no capabilities, RLIMIT_NPROC as an outside cap on that uid)
and execs SCRIPT with the same interpreter. The script then is a supervisor as an application
would run one: `Sandbox` without root, detecting and using what an ordinary user may have.
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
    resource.setrlimit(resource.RLIMIT_NPROC, (OUTSIDE_TASK_CAP, OUTSIDE_TASK_CAP))
    os.setgroups([])
    os.setresgid(int(uid), int(uid), int(uid))
    os.setresuid(int(uid), int(uid), int(uid))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": project, "HOME": "/tmp",
           "PYTHONDONTWRITEBYTECODE": "1"}
    os.execve(sys.executable, [sys.executable, script, *args], env)


if __name__ == "__main__":
    main()
