"""The daemon as a process: sockets, tokens, signals, drain, reload, orphans, readiness.

Each test starts the real daemon (`python -m sandbox serve`) as a subprocess and always reaps it.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from click.testing import CliRunner
from conftest import BASE_NAME, execution_children, wait_until_gone, zygotes_below
from daemon_util import EXAMPLES, TOKEN, Daemon, metric, wait_for, write_skill

from sandbox import cli
from sandbox.client import DaemonBusy, DaemonUnavailable
from worker.protocol import ExecutionRequest, ExecutionStatus

ECHO = EXAMPLES / "echo"
SLEEP_CODE = """
import time

def run(input):
    time.sleep(input.get("seconds", 0))
    return {"slept": input.get("seconds", 0), "version": VERSION}

VERSION = "v1"
"""


@pytest.fixture
def sleeper(tmp_path: Path) -> Path:
    root = tmp_path / "skills"
    write_skill(root, "sleeper", SLEEP_CODE, "[limits]\ntimeout = 20\n")
    return root


def _run_in_thread(function: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function()
        except BaseException as exc:  # noqa: BLE001 - handed to the test, which asserts on it
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def _inflight(item: Daemon) -> int:
    with item.http() as http:
        return int(http.get("/v1/status").json()["inflight"])


# -- sockets -------------------------------------------------------------------------------------


def test_unix_socket_is_mode_0600_and_removed_on_sigterm(
        start_daemon: Callable[..., Daemon]) -> None:
    item = start_daemon([ECHO]).start()
    info = os.stat(item.socket)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    with item.client() as client:
        result = client.execute(ExecutionRequest(skill_id="examples/echo", input=b'{"a": 1}'))
    assert result.status is ExecutionStatus.SUCCESS
    assert result.json() == {"a": 1}
    assert item.stop() == 0
    assert not item.socket.exists()
    assert item.find_events("stopped")


def test_stale_socket_left_by_a_dead_daemon_is_replaced(
        start_daemon: Callable[..., Daemon]) -> None:
    item = start_daemon([ECHO])
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(item.socket))  # a socket file nobody listens on any more
    stale.close()
    assert item.socket.exists()
    item.start()
    assert item.find_events("removed stale socket", socket=str(item.socket))
    with item.client() as client:
        assert client.can_execute("examples/echo")
    assert item.stop() == 0


def test_second_daemon_on_a_live_socket_refuses_and_first_keeps_serving(
        start_daemon: Callable[..., Daemon]) -> None:
    first = start_daemon([ECHO]).start()
    second = start_daemon([ECHO])
    second.socket = first.socket
    second.command[second.command.index("--socket") + 1] = str(first.socket)
    assert second.spawn().wait(timeout=20) == 3
    assert "another process is listening" in second.log_text()
    with first.client() as client:
        assert client.execute(ExecutionRequest(skill_id="examples/echo")).ok
    assert first.stop() == 0


def test_a_regular_file_at_the_socket_path_is_not_replaced(
        start_daemon: Callable[..., Daemon]) -> None:
    item = start_daemon([ECHO])
    item.socket.write_text("precious")
    assert item.spawn().wait(timeout=20) == 3
    assert "is not a socket" in item.log_text()
    assert item.socket.read_text() == "precious"


# -- TCP and tokens ------------------------------------------------------------------------------


def test_tcp_without_a_token_refuses_to_start(start_daemon: Callable[..., Daemon]) -> None:
    item = start_daemon([ECHO], args=["--tcp", "127.0.0.1:0"])
    assert item.spawn().wait(timeout=20) == 2
    assert "refusing to listen on TCP without a bearer token" in item.log_text()
    assert not item.socket.exists()


def test_tcp_needs_the_bearer_token_and_refusals_are_logged_and_counted(
        start_daemon: Callable[..., Daemon]) -> None:
    item = start_daemon([ECHO], tcp=True).start()
    assert item.tcp_address is not None and item.tcp_address.startswith("127.0.0.1:")
    with item.tcp_http() as anonymous:
        missing = anonymous.post("/v1/execute", json={"skill_id": "examples/echo"})
        assert anonymous.get("/healthz").status_code == 200  # liveness probes need no token
    with item.tcp_http(token="x" * len(TOKEN)) as wrong:
        bad = wrong.get("/v1/skills")
    with item.tcp_http(token=TOKEN) as right:
        good = right.post("/v1/execute", json={"skill_id": "examples/echo", "input": [1, 2]})
        metrics = right.get("/metrics").text
    assert missing.status_code == 401 and missing.json()["code"] == "unauthorized"
    assert "missing bearer token" in missing.json()["error"]
    assert missing.headers["www-authenticate"] == "Bearer"
    assert bad.status_code == 401 and "invalid bearer token" in bad.json()["error"]
    assert good.status_code == 200 and good.json()["output"] == [1, 2]
    assert metric(metrics, "skill_sandbox_rejected_requests_total", reason="unauthorized") == 2
    refusals = item.find_events("request refused", reason="unauthorized")
    assert {event["error"] for event in refusals} == {"missing bearer token",
                                                      "invalid bearer token"}
    assert all(TOKEN not in line for line in item.log_text().splitlines())
    # the Unix socket keeps working without a token: its file mode is the access control
    with item.http() as local:
        assert local.get("/v1/skills").status_code == 200
    assert item.stop() == 0


# -- drain -------------------------------------------------------------------------------------


def test_sigterm_lets_in_flight_finish_and_refuses_new_work(
        start_daemon: Callable[..., Daemon], sleeper: Path) -> None:
    item = start_daemon([sleeper, ECHO]).start()
    client = item.client()
    try:
        thread, outcome = _run_in_thread(lambda: client.execute(ExecutionRequest(
            skill_id="test/sleeper", input=b'{"seconds": 2.5}')))
        wait_for(lambda: _inflight(item) == 1, what="the execution to be in flight")
        item.signal(signal.SIGTERM)
        with item.http() as http:
            wait_for(lambda: http.get("/healthz").json()["draining"], what="draining")
            refused = http.post("/v1/execute", json={"skill_id": "examples/echo"})
            not_ready = http.get("/readyz")
        assert refused.status_code == 503 and refused.json()["code"] == "draining"
        assert not_ready.status_code == 503
        with pytest.raises(DaemonUnavailable, match="shutting down"):
            client.execute(ExecutionRequest(skill_id="examples/echo"))
        thread.join(timeout=20)
        assert outcome["value"].status is ExecutionStatus.SUCCESS
        assert outcome["value"].json()["slept"] == 2.5
        assert item.wait() == 0
    finally:
        client.close()


def test_in_flight_work_past_the_grace_period_is_canceled_and_reaped(
        start_daemon: Callable[..., Daemon], sleeper: Path) -> None:
    item = start_daemon([sleeper], args=["--grace-period", "0.3"]).start()
    with item.http() as http:
        zygote = http.get("/v1/skills/test/sleeper").json()["zygote"]["pid"]
    client = item.client()
    try:
        thread, outcome = _run_in_thread(lambda: client.execute(ExecutionRequest(
            skill_id="test/sleeper", input=b'{"seconds": 15}')))
        wait_for(lambda: execution_children(psutil.Process(zygote)), what="the execution child")
        child = execution_children(psutil.Process(zygote))[0].pid
        item.signal(signal.SIGTERM)
        thread.join(timeout=20)
        assert outcome["value"].status is ExecutionStatus.CANCELED
        assert item.wait() == 0
        assert wait_until_gone({zygote, child}) == set()
        assert item.find_events("grace period over: canceling executions")
    finally:
        client.close()


def test_kill_9_of_the_daemon_leaves_no_zygote_or_worker(
        start_daemon: Callable[..., Daemon], sleeper: Path) -> None:
    item = start_daemon([sleeper, ECHO]).start()
    with item.http() as http:
        skills = http.get("/v1/status").json()["skills"]
    zygotes = {skill["zygote_pid"] for skill in skills}
    # (by id: a zygote forked from the shared base has the base's command line, no skill path)
    sleeper_zygote = next(skill["zygote_pid"] for skill in skills if skill["id"] == "test/sleeper")
    client = item.client()
    try:
        thread, outcome = _run_in_thread(lambda: client.execute(ExecutionRequest(
            skill_id="test/sleeper", input=b'{"seconds": 15}')))
        wait_for(lambda: execution_children(psutil.Process(sleeper_zygote)), what="the worker")
        workers = {child.pid for child in psutil.Process(sleeper_zygote).children()}
        bases = {child.pid for child in psutil.Process(item.process.pid).children()
                 if child.name() == BASE_NAME}
        assert bases  # the zygotes were forked from a shared base, which must go too
        item.process.kill()
        item.wait()
        assert wait_until_gone(zygotes | workers | bases, timeout=5.0) == set()
        thread.join(timeout=10)
        assert isinstance(outcome.get("error"), DaemonUnavailable)
    finally:
        client.close()


def test_queue_full_is_answered_429(start_daemon: Callable[..., Daemon], sleeper: Path) -> None:
    item = start_daemon([sleeper], args=["--max-concurrency", "1", "--max-queue", "0"]).start()
    client = item.client()
    try:
        thread, outcome = _run_in_thread(lambda: client.execute(ExecutionRequest(
            skill_id="test/sleeper", input=b'{"seconds": 1.5}')))
        wait_for(lambda: _inflight(item) == 1, what="the execution to be in flight")
        with pytest.raises(DaemonBusy, match="max_concurrency"):
            client.execute(ExecutionRequest(skill_id="test/sleeper"))
        thread.join(timeout=20)
        assert outcome["value"].ok
        assert item.find_events("request refused", reason="queue_full")
    finally:
        client.close()
    assert item.stop() == 0


# -- reload ------------------------------------------------------------------------------------


def test_sighup_reloads_a_changed_skill_under_load_without_dropping_work(
        start_daemon: Callable[..., Daemon], sleeper: Path) -> None:
    item = start_daemon([sleeper], args=["--max-concurrency", "2"]).start()
    client = item.client()
    try:
        def call() -> Any:
            return client.execute(ExecutionRequest(skill_id="test/sleeper",
                                                   input=b'{"seconds": 1}'))

        before = [_run_in_thread(call) for _ in range(4)]
        wait_for(lambda: _inflight(item) >= 2, what="executions in flight")
        main = sleeper / "sleeper" / "main.py"
        main.write_text(SLEEP_CODE.replace('"v1"', '"v2"'))
        item.signal(signal.SIGHUP)
        during = [_run_in_thread(call) for _ in range(2)]
        wait_for(lambda: len(item.find_events("reload")) == 2, what="the reload")
        for thread, _ in before + during:
            thread.join(timeout=20)
        results = [outcome["value"] for _, outcome in before + during]
        assert [result.status for result in results] == [ExecutionStatus.SUCCESS] * 6
        assert {result.json()["version"] for result in results} <= {"v1", "v2"}
        assert item.find_events("reload")[-1]["reloaded"] == ["test/sleeper"]
        assert call().json()["version"] == "v2"
    finally:
        client.close()
    assert item.stop() == 0


def test_reload_adds_new_removes_deleted_and_keeps_a_broken_skill(
        start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    root = tmp_path / "skills"
    write_skill(root, "keep", "def run(input):\n    return 'keep'\n")
    doomed = write_skill(root, "doomed", "def run(input):\n    return 'doomed'\n")
    broken = write_skill(root, "broken", "def run(input):\n    return 'good'\n")
    item = start_daemon([root]).start()
    with item.client() as client:
        write_skill(root, "fresh", "def run(input):\n    return 'fresh'\n")
        for path in doomed.iterdir():
            path.unlink()
        doomed.rmdir()
        (broken / "skill.toml").write_text('id = "test/broken"\nentrypoint = "no colon"\n')
        report = client.reload()
        assert report["added"] == ["test/fresh"]
        assert report["removed"] == ["test/doomed"]
        assert "test/broken" in report["unchanged"] and "test/keep" in report["unchanged"]
        assert any("field 'entrypoint'" in error for error in report["errors"])
        assert client.execute(ExecutionRequest(skill_id="test/fresh")).json() == "fresh"
        assert client.execute(ExecutionRequest(skill_id="test/broken")).json() == "good"
        assert not client.can_execute("test/doomed")
        assert client.status()["skill_errors"] == report["errors"]
    assert item.stop() == 0


def test_sighup_reloads_the_policy(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[default]\nallowed_skills = ["examples/*"]\n')
    item = start_daemon([ECHO], args=["--policy", str(policy)]).start()
    with item.client() as client:
        assert client.execute(ExecutionRequest(skill_id="examples/echo")).ok
        policy.write_text('[default]\nallowed_skills = ["other/*"]\n')
        item.signal(signal.SIGHUP)
        wait_for(lambda: len(item.find_events("reload")) == 2, what="the reload")
        denied = client.execute(ExecutionRequest(skill_id="examples/echo"))
    assert denied.status is ExecutionStatus.REJECTED
    assert denied.error.startswith("runtime: policy rejected execution: ")
    assert item.stop() == 0


# -- zygotes and readiness -----------------------------------------------------------------------


def test_a_dead_zygote_is_restarted_and_counted(start_daemon: Callable[..., Daemon]) -> None:
    item = start_daemon([ECHO]).start()
    with item.client() as client:
        old = client.skill("examples/echo")["zygote"]["pid"]
        os.kill(old, signal.SIGKILL)

        def restarted() -> bool:
            zygote = client.skill("examples/echo")["zygote"]
            return bool(zygote["pid"] != old and zygote["alive"])

        wait_for(restarted, what="the zygote to be restarted")
        wait_for(lambda: metric(client.metrics(), "skill_sandbox_zygote_restarts_total",
                                skill="examples/echo") == 1, what="the restart to be counted")
        assert client.ready()
        assert client.execute(ExecutionRequest(skill_id="examples/echo")).ok
    assert item.find_events("zygote died; restarting", skill_id="examples/echo")
    assert item.stop() == 0


def test_systemd_is_told_ready_and_stopping(start_daemon: Callable[..., Daemon]) -> None:
    item = start_daemon([ECHO])
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(item.dir / "notify"))
    listener.settimeout(20)
    item.env["NOTIFY_SOCKET"] = str(item.dir / "notify")
    try:
        item.start()
        ready = listener.recv(4096).decode()
        item.signal(signal.SIGTERM)
        stopping = listener.recv(4096).decode()
        assert item.wait() == 0
    finally:
        listener.close()
    assert "READY=1" in ready.splitlines() and f"MAINPID={item.pid}" in ready.splitlines()
    assert "STOPPING=1" in stopping.splitlines()


def test_invalid_config_file_exits_2_naming_file_and_field(
        start_daemon: Callable[..., Daemon]) -> None:
    item = start_daemon([ECHO], config="max_queue = -1\n[limits]\ntimeout = 'soon'\n")
    assert item.spawn().wait(timeout=20) == 2
    text = item.log_text()
    assert f"{item.dir / 'config.toml'}: field 'max_queue'" in text
    assert f"{item.dir / 'config.toml'}: field 'limits.timeout'" in text


def test_a_client_hanging_up_cancels_its_execution(
        start_daemon: Callable[..., Daemon], sleeper: Path) -> None:
    item = start_daemon([sleeper]).start()
    with item.http() as http:
        zygote = http.get("/v1/skills/test/sleeper").json()["zygote"]["pid"]
    hasty = httpx.Client(transport=httpx.HTTPTransport(uds=str(item.socket)),
                         base_url="http://daemon", timeout=httpx.Timeout(30, read=0.5))
    with hasty, pytest.raises(httpx.ReadTimeout):
        hasty.post("/v1/execute", json={"skill_id": "test/sleeper",
                                        "input": {"seconds": 15}, "request_id": "gone-1"})
    wait_for(lambda: item.find_events("caller disconnected; execution canceled",
                                      request_id="gone-1"), what="the cancel")
    wait_for(lambda: _inflight(item) == 0, what="the slot to be free")
    executions = {child.pid for child in execution_children(psutil.Process(zygote))}
    assert wait_until_gone(executions) == set()
    assert item.stop() == 0


def test_reloading_an_unchanged_policy_keeps_its_rate_limit_state(
        start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[default]\nallowed_skills = ["*"]\n'
                      'rate_limit = { rate = 0.001, burst = 1 }\n')
    item = start_daemon([ECHO], args=["--policy", str(policy)]).start()
    with item.client() as client:
        assert client.execute(ExecutionRequest(skill_id="examples/echo")).ok
        assert "rate limit" in client.execute(ExecutionRequest(skill_id="examples/echo")).error
        client.reload()  # same file: the bucket stays empty, no free burst
        assert "rate limit" in client.execute(ExecutionRequest(skill_id="examples/echo")).error
        policy.write_text('[default]\nallowed_skills = ["*"]\n')
        client.reload()
        assert client.execute(ExecutionRequest(skill_id="examples/echo")).ok
    assert item.stop() == 0


def test_a_zygote_that_cannot_boot_is_retried_with_backoff_and_not_ready(
        start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    root = tmp_path / "skills"
    skill = write_skill(root, "fragile", "def run(input):\n    return 'ok'\n")
    item = start_daemon([root], args=["--zygote-backoff-max", "2"]).start()
    with item.client() as client:
        (skill / "main.py").write_text("def run(input) return\n")  # no longer compiles
        os.kill(client.skill("test/fragile")["zygote"]["pid"], signal.SIGKILL)
        failures = wait_for(lambda: item.find_events("zygote restart failed")[1:],
                            what="two failed restarts")
        assert [event["retry_in"] for event in item.find_events("zygote restart failed")][:2] \
            == [1.0, 2.0]
        assert "SyntaxError" in failures[0]["error"]
        assert not client.ready()
        with item.http() as http:
            assert http.get("/readyz").json()["zygotes_down"] == ["test/fragile"]
        (skill / "main.py").write_text("def run(input):\n    return 'healed'\n")
        wait_for(client.ready, timeout=15, what="the zygote to come back")
        assert client.execute(ExecutionRequest(skill_id="test/fragile")).json() == "healed"
    assert item.stop() == 0


def test_disabled_isolation_layers_are_reported_at_start_and_in_status(
        start_daemon: Callable[..., Daemon]) -> None:
    item = start_daemon([ECHO], args=["--isolation-disabled", "netns"]).start()
    with item.client() as client:
        layers = {layer["name"]: layer for layer in client.status()["isolation"]}
        assert client.execute(ExecutionRequest(skill_id="examples/echo")).ok
    assert layers["network"]["status"] != "active"
    assert all(set(layer) == {"name", "status", "detail"} for layer in layers.values())
    [warning] = item.find_events("isolation layers not fully active")
    assert "network" in warning
    assert item.stop() == 0


def test_a_required_layer_that_is_disabled_refuses_to_start(
        start_daemon: Callable[..., Daemon]) -> None:
    item = start_daemon([ECHO], args=["--isolation-disabled", "seccomp",
                                "--isolation-required", "seccomp"])
    assert item.spawn().wait(timeout=20) == 2
    assert "both required and disabled" in item.log_text()


# -- lazy zygotes ---------------------------------------------------------------------------------


def test_reload_with_lazy_skills_keeps_hot_ones_warm_and_cold_ones_cold(
        start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    root = tmp_path / "skills"
    for name in ("alpha", "beta", "gamma"):
        write_skill(root, name, SLEEP_CODE)
    item = start_daemon([root], warm=False,
                  args=["--warm", "test/alpha", "--max-zygotes", "2"]).start()
    with item.client() as client:
        def states() -> dict[str, str]:
            return {skill["id"]: skill["zygote_state"] for skill in client.status()["skills"]}

        # Only the warm-listed skill has a zygote; the cold ones do not make it unready.
        assert states() == {"test/alpha": "warm", "test/beta": "cold", "test/gamma": "cold"}
        assert zygotes_below(item.pid) == {client.skill("test/alpha")["zygote"]["pid"]}
        assert client.ready()
        text = client.metrics()
        assert metric(text, "skill_sandbox_zygotes_live") == 1
        assert metric(text, "skill_sandbox_zygote_cold_starts_total") == 1
        assert client.execute(ExecutionRequest(skill_id="test/beta")).ok
        # A third zygote with max_zygotes 2: the least recently used idle one goes.
        assert client.execute(ExecutionRequest(skill_id="test/gamma")).ok
        text = client.metrics()
        assert metric(text, "skill_sandbox_zygote_evictions_total") == 1
        assert metric(text, "skill_sandbox_zygotes_live") == 2
        assert states()["test/alpha"] == "evicted" and client.ready()
        listing = CliRunner().invoke(cli.main, ["skills", "list", "--socket", str(item.socket)])
        rows = {line.split()[0]: line.split() for line in listing.output.splitlines()[1:]}
        assert "evicted" in rows["test/alpha"] and "warm" in rows["test/gamma"], listing.output
        assert len(zygotes_below(item.pid)) == 2
        detail = client.skill("test/gamma")["zygote"]
        assert detail["state"] == "warm" and detail["pss_kb"] > 0 and detail["last_used"]

        # Change a running skill and an evicted (but warm-listed) one, add one; reload.
        (root / "gamma" / "main.py").write_text(SLEEP_CODE.replace("v1", "v2"))
        (root / "alpha" / "main.py").write_text(SLEEP_CODE.replace("v1", "v2"))
        write_skill(root, "delta", SLEEP_CODE)
        report = client.reload()
        assert report["reloaded"] == ["test/alpha", "test/gamma"]
        assert report["added"] == ["test/delta"] and not report["errors"]
        after = states()
        assert after["test/gamma"] == "warm"  # it was running: its new version is booted
        assert after["test/alpha"] == "warm"  # in the warm list
        assert after["test/delta"] == "cold"
        for skill_id in ("test/gamma", "test/alpha", "test/delta"):
            result = client.execute(ExecutionRequest(skill_id=skill_id))
            assert result.ok and result.json()["version"] == ("v1" if skill_id == "test/delta"
                                                              else "v2"), result
        # No restart was counted: cold starts and evictions are not crashes.
        assert metric(client.metrics(), "skill_sandbox_zygote_restarts_total",
                      skill="test/alpha") == 0
    assert item.stop() == 0
