"""Attacks on files: host secrets, the supervisor's /proc, writes outside the workdir, symlinks,
and files left behind."""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox import ExecutionStatus
from sandbox.capabilities import IsolationConfig
from tests.security.hostile import Hostile, layer_variants, requires

_TRY_READ = """
    def attack(input):
        outcome = {}
        for path in input["paths"]:
            try:
                if os.path.isdir(path):
                    outcome[path] = "listed " + ",".join(sorted(os.listdir(path)))
                else:
                    with open(path, "rb") as handle:
                        outcome[path] = "read " + handle.read(4096).decode("latin-1")
            except OSError as exc:
                outcome[path] = f"denied {errno.errorcode.get(exc.errno, exc.errno)}"
        return outcome
"""


@pytest.fixture
def host_secret() -> Iterator[tuple[Path, str]]:
    """A world-readable file holding a secret, outside any skill or workdir: only the sandbox's
    layers (not file modes) can keep a skill from reading it."""
    secret = secrets.token_hex(16)
    directory = Path(tempfile.mkdtemp(prefix="skill-sandbox-secret-"))
    directory.chmod(0o755)
    path = directory / "secret.txt"
    path.write_text(secret)
    path.chmod(0o644)
    try:
        yield path, secret
    finally:
        path.unlink()
        directory.rmdir()


@requires("filesystem")
@layer_variants("all layers", "landlock alone")
def test_host_secrets_and_home_directories_are_unreadable(
        hostile: Callable[..., Hostile], host_secret: tuple[Path, str],
        isolation: IsolationConfig) -> None:
    secret_path, secret = host_secret
    paths = ["/etc/shadow", "/root", "/root/.bashrc", "/home", str(secret_path),
             str(secret_path.parent), "/etc", "/var/log", "/tmp"]
    attack = hostile(_TRY_READ, isolation=isolation)
    result = attack.run(paths=paths)
    assert result.status is ExecutionStatus.SUCCESS, result
    outcome = result.json()
    leaked = {path: what for path, what in outcome.items() if not what.startswith("denied ")}
    assert leaked == {} or all("No such" in what for what in leaked.values()), leaked
    assert secret not in result.output.decode()
    attack.assert_still_serving()


@requires("supervisor hidden")
@layer_variants("all layers", "landlock alone")
def test_supervisor_and_zygote_proc_files_and_environment_stay_secret(
        hostile: Callable[..., Hostile], monkeypatch: pytest.MonkeyPatch,
        isolation: IsolationConfig) -> None:
    secret = secrets.token_hex(16)
    monkeypatch.setenv("SKILL_SANDBOX_TEST_SECRET", secret)  # in the supervisor only
    attack = hostile("""
        def attack(input):
            outcome = {"own_environ": dict(os.environ)}
            targets = {"supervisor": input["supervisor"], "zygote": zygote_pid()}
            for who, pid in targets.items():
                for name in ("environ", "cmdline", "mem", "maps", "status", "fd"):
                    path = f"/proc/{pid}/{name}"
                    try:
                        if name == "fd":
                            outcome[f"{who}/{name}"] = os.listdir(path)
                        else:
                            with open(path, "rb") as handle:
                                outcome[f"{who}/{name}"] = handle.read(65536).decode("latin-1")
                    except OSError as exc:
                        outcome[f"{who}/{name}"] = f"denied {exc.errno}"
            found = []
            try:
                for entry in os.listdir("/proc"):
                    try:
                        with open(f"/proc/{entry}/environ", "rb") as handle:
                            found.append(handle.read().decode("latin-1"))
                    except OSError:
                        pass
            except OSError as exc:
                found.append(f"denied {exc.errno}")
            outcome["scan"] = found
            return outcome
    """, isolation=isolation)
    result = attack.run(supervisor=os.getpid())
    assert result.status is ExecutionStatus.SUCCESS, result
    outcome = result.json()
    assert secret not in result.output.decode()
    assert "SKILL_SANDBOX_TEST_SECRET" not in outcome["own_environ"]
    for who in ("supervisor", "zygote"):
        for name in ("environ", "cmdline", "mem", "maps", "status", "fd"):
            assert str(outcome[f"{who}/{name}"]).startswith("denied "), (who, name)
    attack.assert_still_serving()


@requires("filesystem")
@layer_variants("all layers", "landlock alone")
def test_writes_outside_the_workdir_are_refused(hostile: Callable[..., Hostile],
                                                isolation: IsolationConfig) -> None:
    marker = f"skill-sandbox-escape-{secrets.token_hex(8)}"
    attack = hostile("""
        def attack(input):
            outcome = {}
            here = os.path.dirname(os.path.abspath(__file__))
            for directory in ("/tmp", "/var/tmp", "/dev/shm", here, "/root",
                              os.path.expanduser("~root"), "/etc", os.getcwd()):
                path = os.path.join(directory, input["marker"])
                try:
                    with open(path, "w") as handle:
                        handle.write("escaped")
                    outcome[directory] = "written"
                except OSError as exc:
                    outcome[directory] = f"denied {errno.errorcode.get(exc.errno, exc.errno)}"
            outcome["workdir"] = os.getcwd()
            return outcome
    """, isolation=isolation)
    result = attack.run(marker=marker)
    assert result.status is ExecutionStatus.SUCCESS, result
    outcome = result.json()
    workdir = outcome.pop("workdir")
    assert outcome.pop(workdir) == "written"  # its own workdir is writable
    assert all(what.startswith("denied ") for what in outcome.values()), outcome
    for directory in ("/tmp", "/var/tmp", "/dev/shm", str(attack.skill.path), "/root", "/etc"):
        assert not os.path.exists(os.path.join(directory, marker)), directory
    attack.assert_still_serving()


@requires("filesystem")
@layer_variants("all layers", "landlock alone")
def test_symlink_and_hardlink_from_the_workdir_do_not_reach_host_files(
        hostile: Callable[..., Hostile], host_secret: tuple[Path, str],
        isolation: IsolationConfig) -> None:
    secret_path, secret = host_secret
    attack = hostile("""
        def attack(input):
            outcome = {}
            for target in (input["secret"], "/etc/shadow"):
                link = f"link-{len(outcome)}"
                os.symlink(target, link)
                try:
                    with open(link) as handle:
                        outcome[target] = "read " + handle.read()
                except OSError as exc:
                    outcome[target] = f"denied {errno.errorcode.get(exc.errno, exc.errno)}"
                try:
                    os.link(target, f"hard-{len(outcome)}")
                    outcome[target + " (hardlink)"] = "linked"
                except OSError as exc:
                    outcome[target + " (hardlink)"] = f"denied {exc.errno}"
            return outcome
    """, isolation=isolation)
    result = attack.run(secret=str(secret_path))
    assert result.status is ExecutionStatus.SUCCESS, result
    assert secret not in result.output.decode()
    assert all(what.startswith("denied ") for what in result.json().values()), result.json()
    attack.assert_still_serving()


def test_no_file_of_the_execution_is_left_behind(hostile: Callable[..., Hostile]) -> None:
    attack = hostile("""
        def attack(input):
            os.makedirs("deep/er/still")
            for index in range(20):
                with open(f"deep/er/still/file{index}", "w") as handle:
                    handle.write("x" * 1000)
            os.symlink("/etc/hostname", "link")
            os.mkfifo("fifo")
            return {"workdir": os.getcwd(), "seen": sorted(os.listdir("."))}
    """)
    workdir_root = attack.sandbox.workdir_root
    first = attack.run()
    assert first.status is ExecutionStatus.SUCCESS, first
    assert first.json()["seen"] == ["deep", "fifo", "link"]
    assert not os.path.lexists(first.json()["workdir"])
    second = attack.run()
    assert second.json()["seen"] == ["deep", "fifo", "link"]  # a fresh, empty workdir again
    assert os.listdir(workdir_root) == []
    attack.assert_still_serving()


@requires("filesystem")
def test_an_operator_allowed_directory_is_readable_but_not_writable(
        hostile: Callable[..., Hostile], host_secret: tuple[Path, str]) -> None:
    secret_path, secret = host_secret
    attack = hostile("""
        def attack(input):
            with open(input["path"]) as handle:
                content = handle.read()
            try:
                with open(input["path"] + ".copy", "w") as handle:
                    handle.write(content)
                written = "written"
            except OSError as exc:
                written = f"denied {errno.errorcode.get(exc.errno, exc.errno)}"
            return {"content": content, "write": written}
    """, isolation=IsolationConfig(read_only=(str(secret_path.parent),)))
    result = attack.run(path=str(secret_path))
    assert result.status is ExecutionStatus.SUCCESS, result
    assert result.json()["content"] == secret
    assert result.json()["write"].startswith("denied ")
    assert not secret_path.with_suffix(".txt.copy").exists()
    attack.assert_still_serving()
