"""The daemon against hostile and careless clients (issue 12), through real sockets against a
real daemon process: label floods, slow and idle connections, fd exhaustion, unencodable text,
rotating tenant ids, forged log lines, leftovers after kill -9, lenient types, and the queue.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from daemon_util import EXAMPLES, Daemon, metric, wait_for, write_skill

from worker.protocol import ExecutionRequest

ECHO = EXAMPLES / "echo"
SLEEP_CODE = "import time\n\ndef run(input):\n    time.sleep(input.get('seconds', 0))\n" \
             "    return {'slept': input.get('seconds', 0)}\n"
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def sleeper(tmp_path: Path) -> Path:
    root = tmp_path / "skills"
    write_skill(root, "sleeper", SLEEP_CODE, "[limits]\ntimeout = 20\n")
    return root


def _tcp(item: Daemon, timeout: float = 20.0) -> socket.socket:
    assert item.tcp_address is not None
    host, _, port = item.tcp_address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    return sock


def _unix(item: Daemon, timeout: float = 20.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(item.socket))
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (the socket's timeout is the deadline)."""
    chunks: list[bytes] = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def _run(client: Any, skill_id: str, value: Any) -> Any:
    return client.execute(ExecutionRequest(skill_id=skill_id, input=json.dumps(value).encode()))


def _post_raw(http: httpx.Client, path: str, body: bytes) -> httpx.Response:
    return http.post(path, content=body, headers=JSON)


# -- 1. /metrics labels ------------------------------------------------------------------------


def test_metrics_labels_come_only_from_loaded_skills(start_daemon: Callable[..., Daemon]) -> None:
    item = start_daemon([ECHO]).start()
    ids = [f"nope/{uuid.uuid4().hex}" for _ in range(40)] + \
        ["evil/\x00nul", "evil/new\nline", 'evil/quote"}', "evil/\u2028sep"]
    with item.http() as http:
        assert http.post("/v1/execute", json={"skill_id": "nope/first"}).json()["status"] \
            == "rejected"
        assert http.post("/v1/execute", json={"skill_id": "examples/echo"}).json()["status"] \
            == "success"
        before = http.get("/metrics").text
        for skill_id in ids:
            answer = http.post("/v1/execute", json={"skill_id": skill_id}).json()
            assert answer["status"] == "rejected" and answer["error_kind"] == "skill_not_loaded"
        after = http.get("/metrics").text
    assert "nope/" not in after and "evil/" not in after
    assert "\x00" not in after and "\u2028" not in after
    assert metric(after, "skill_sandbox_executions_total", skill="other",
                  status="rejected") == len(ids) + 1
    assert metric(after, "skill_sandbox_executions_total", skill="examples/echo",
                  status="success") == 1
    # bounded: 44 more unknown ids only change numbers, not the set of series

    def series(text: str) -> list[str]:
        return [line.rpartition(" ")[0] for line in text.splitlines() if 'skill="' in line]

    assert series(after) == series(before)


# -- 2. slow, idle and too many connections ----------------------------------------------------


def test_idle_trickled_and_stalled_connections_are_closed_at_their_deadlines(
        start_daemon: Callable[..., Daemon]) -> None:
    item = start_daemon([ECHO], tcp=True, args=["--header-timeout", "1", "--body-timeout", "1",
                                          "--keepalive-timeout", "1"]).start()
    idle = _tcp(item)  # connects and says nothing
    trickle = _tcp(item)  # headers one byte at a time, never finished
    stalled = _tcp(item)  # headers done, body never finished
    stalled.sendall(b"POST /v1/execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100\r\nAuthorization: Bearer " + item.token.encode()
                    + b"\r\n\r\n{\"skill_id\"")
    kept = _tcp(item)  # one request answered, then idle on keep-alive
    kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while not answer.endswith(b"}"):  # the whole response, then nothing more
        answer += kept.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200")
    closed: dict[str, bytes] = {}

    def trickler() -> None:
        try:
            for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 200:
                trickle.send(bytes([byte]))
                time.sleep(0.1)
        except OSError:
            return

    thread = threading.Thread(target=trickler, daemon=True)
    thread.start()
    for name, sock in (("idle", idle), ("trickle", trickle), ("stalled", stalled),
                       ("kept", kept)):
        closed[name] = _read_all(sock)  # raises TimeoutError if the server never closes
        sock.close()
    thread.join(timeout=30)
    assert closed["kept"] == b""
    status, headers, body = _response(closed["stalled"])
    assert status == 408 and headers["content-type"] == "application/json"
    assert json.loads(body)["code"] == "body_timeout"
    for name in ("idle", "trickle"):
        if closed[name]:  # an answer is optional before the headers; it must be JSON
            status, headers, body = _response(closed[name])
            assert status == 408 and json.loads(body)["code"] == "header_timeout"
    assert item.find_events("connection timed out", phase="headers")
    assert item.find_events("connection timed out", phase="body")
    with item.tcp_http(item.token) as http:  # the listener still serves
        assert http.post("/v1/execute", json={"skill_id": "examples/echo"}).json()["status"] \
            == "success"


def test_a_connection_flood_under_a_low_fd_limit_keeps_the_unix_socket_serving(
        start_daemon: Callable[..., Daemon]) -> None:
    item = start_daemon([ECHO], tcp=True, nofile=256,
                  args=["--max-concurrency", "2", "--header-timeout", "30"]).start()
    held: list[socket.socket] = []
    refused = 0
    try:
        for _ in range(400):
            try:
                sock = _tcp(item, timeout=5)
            except OSError:
                refused += 1
                continue
            held.append(sock)
        with item.client() as client:  # the Unix socket keeps its own share of fds
            for _ in range(5):
                assert _run(client, "examples/echo", {"n": 1}).ok
        over = _tcp(item)
        status, _, body = _response(_read_all(over))
        over.close()
        assert status == 503 and json.loads(body)["code"] == "too_many_connections"
    finally:
        for sock in held:
            sock.close()
    limits = item.find_events("connection limits")
    assert limits and limits[0]["tcp"] < 256 and limits[0]["unix"] < 256
    text = item.log_text()
    assert text.count("Too many open files") <= 2, "fd errors must be rate-limited"
    assert text.count("Traceback") == 0
    assert len(item.find_events("connection refused: too many connections")) <= 3
    with item.tcp_http(item.token) as http:
        assert http.post("/v1/execute", json={"skill_id": "examples/echo"}).json()["status"] \
            == "success"


def test_a_repeating_event_loop_error_is_one_json_line_per_interval(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The handler the daemon installs on its loop (asyncio calls it per failed accept())."""
    import asyncio
    import errno
    import logging

    from sandbox.daemon import jsonlog
    from sandbox.daemon.server import _loop_errors

    clock = [100.0]
    handler = _loop_errors(jsonlog.RateLimited(interval=10, clock=lambda: clock[0]))
    logger = logging.getLogger("skill_sandbox.server")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    stream = logging.StreamHandler()
    stream.setFormatter(jsonlog.JsonFormatter())
    logger.handlers[:], logger.propagate = [stream], False
    loop = asyncio.new_event_loop()
    try:
        for _ in range(1000):
            handler(loop, {"message": "socket.accept() out of system resource",
                           "exception": OSError(errno.EMFILE, "Too many open files")})
        clock[0] += 10
        handler(loop, {"message": "socket.accept() out of system resource",
                       "exception": OSError(errno.EMFILE, "Too many open files")})
    finally:
        loop.close()
        logger.handlers[:], logger.propagate, _ = saved
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert len(lines) == 2
    assert "exception" not in lines[0]  # the errno says it all: no traceback per attempt
    assert lines[1]["similar_events_not_logged"] == 999


# -- 3. unencodable text -----------------------------------------------------------------------


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/execute", rb'{"skill_id": "examples/echo", "input": "\ud800"}', "input"),
    ("/v1/execute", rb'{"skill_id": "examples/echo", "input": {"a": ["ok", "\udfff"]}}',
     "input.a.1"),
    ("/v1/execute", rb'{"skill_id": "examples/echo", "input": {"\ud800": 1}}', "input"),
    ("/v1/execute", rb'{"skill_id": "examples/echo", "tenant_id": "t\ud800"}', "tenant_id"),
    ("/v1/plans", rb'{"plan": {"steps": [{"name": "examples/echo", "type": "skill", '
                  rb'"arguments": {"x": "\ud800"}}]}}', "plan.steps.0.arguments.x"),
    ("/v1/plans", rb'{"plan": {"steps": []}, "context": {"tenant_id": "\udbff"}}',
     "context.tenant_id"),
])
def test_lone_surrogates_are_a_400_naming_the_field(
        start_daemon: Callable[..., Daemon], path: str, body: bytes, field: str) -> None:
    item = start_daemon([ECHO]).start()
    with item.http() as http:
        response = _post_raw(http, path, body)
        assert response.status_code == 400
        answer = response.json()
        assert answer["code"] == "invalid_body"
        assert [problem["field"] for problem in answer["problems"]] == [field]
        assert f"field '{field}'" in answer["error"]
        text = http.get("/metrics").text
    assert metric(text, "skill_sandbox_http_requests_total", code="500") == 0
    assert "Traceback" not in item.log_text()


# -- 4. the default policy against rotating tenant ids -----------------------------------------


def test_default_policy_is_one_aggregate_limit_for_unnamed_tenants(
        start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[default]\nrate_limit = { rate = 0.001, burst = 2 }\n"
                      "[tenants.acme]\nrate_limit = { rate = 0.001, burst = 1 }\n")
    item = start_daemon([ECHO], args=["--policy", str(policy)]).start()
    with item.http() as http:
        statuses = [http.post("/v1/execute", json={"skill_id": "examples/echo",
                                                   "tenant_id": f"rotating-{n}"}).json()
                    for n in range(10)]
        acme = [http.post("/v1/execute", json={"skill_id": "examples/echo",
                                               "tenant_id": "acme"}).json()["status"]
                for _ in range(2)]
    assert [answer["status"] for answer in statuses].count("success") == 2
    assert all("[default]" in answer["error"] for answer in statuses[2:])
    assert acme == ["success", "rejected"]  # a named tenant keeps its own bucket


def test_per_tenant_default_state_is_evicted_when_idle(
        start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('default_scope = "per_tenant"\n'
                      "[default]\nrate_limit = { rate = 0.5, burst = 1 }\n")
    item = start_daemon([ECHO], args=["--policy", str(policy)]).start()
    with item.http() as http:
        answers = [http.post("/v1/execute", json={"skill_id": "examples/echo",
                                                  "tenant_id": f"t-{n}"}).json()["status"]
                   for n in range(20)]
        assert answers.count("success") == 20  # per_tenant: each id its own bucket
        tracked = metric(http.get("/metrics").text, "skill_sandbox_policy_tenants_tracked")
        assert tracked >= 1
        wait_for(lambda: metric(http.get("/metrics").text,
                                "skill_sandbox_policy_tenants_tracked") == 0, 15,
                 0.2, "idle tenant state to be evicted")


# -- 5. logging --------------------------------------------------------------------------------


def test_every_stderr_line_is_one_json_object_in_json_mode(
        start_daemon: Callable[..., Daemon]) -> None:
    item = start_daemon([ECHO]).start()
    with item.http() as http:
        assert http.post("/v1/execute", json={"skill_id": "examples/echo"}).json()["status"] \
            == "success"
        lock = sqlite3.connect(item.exec_log, timeout=5)
        try:  # the execution log cannot be written: the library logs its failure
            lock.execute("BEGIN EXCLUSIVE")
            answer = http.post("/v1/execute", json={"skill_id": "examples/echo"}).json()
            assert answer["status"] == "success"  # a broken log never fails the execution
        finally:
            lock.rollback()
            lock.close()
    raw = _unix(item)
    raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
    _read_all(raw)
    raw.close()
    assert item.stop() == 0
    lines = [line for line in item.log_text().splitlines() if line.strip()]
    for line in lines:
        assert isinstance(json.loads(line), dict), line
    failures = [json.loads(line) for line in lines if "execution logger" in line]
    assert failures and failures[0]["level"] == "error" and "exception" in failures[0]


def test_text_mode_escapes_control_characters_so_lines_cannot_be_forged(
        start_daemon: Callable[..., Daemon]) -> None:
    item = start_daemon([ECHO], args=["--log-format", "text"])
    item.spawn()
    wait_for(lambda: " listening " in item.log_text(), 20, 0.05, "the daemon to listen")
    forged = "x\n12:00:00 error   FORGED line\r\x1b[2J\u2028sep"
    with item.http() as http:
        answer = http.post("/v1/execute", json={"skill_id": "examples/echo",
                                                "tenant_id": forged}).json()
    assert answer["status"] == "success"
    wait_for(lambda: "tenant_id=" in item.log_text(), 10, 0.05, "the execution line")
    text = item.log_text()
    assert not any(line.startswith("12:00:00 error   FORGED") for line in text.splitlines())
    assert "\x1b" not in text and "\u2028" not in text and "\r" not in text
    assert "\\n12:00:00 error   FORGED" in text


def test_a_client_hanging_up_mid_body_is_info_and_not_a_500(
        start_daemon: Callable[..., Daemon]) -> None:
    item = start_daemon([ECHO]).start()
    for path in ("/v1/execute", "/v1/plans"):
        sock = _unix(item)
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     "Content-Length: 1000\r\n\r\n{\"skill_id\": ".encode())
        time.sleep(0.2)
        sock.close()
    wait_for(lambda: len(item.find_events("client disconnected before the body was read"))
             == 2, 10, 0.05, "both hang-ups to be logged")
    events = item.find_events("client disconnected before the body was read")
    assert all(event["level"] == "info" for event in events)
    assert not item.find_events("internal error")
    with item.http() as http:
        text = http.get("/metrics").text
    assert metric(text, "skill_sandbox_http_requests_total", code="500") == 0
    assert metric(text, "skill_sandbox_http_requests_total", route="/v1/execute",
                  code="499") == 1


# -- 6. leftovers and file modes ---------------------------------------------------------------


def test_workdirs_left_by_a_killed_daemon_are_swept_at_the_next_start(
        start_daemon: Callable[..., Daemon], sleeper: Path, tmp_path: Path) -> None:
    first = start_daemon([sleeper]).start()
    client = first.client()

    def doomed() -> None:
        with contextlib.suppress(Exception):  # its daemon is killed under it
            _run(client, "test/sleeper", {"seconds": 15})

    thread = threading.Thread(target=doomed, daemon=True)
    thread.start()
    root = Path(tempfile.gettempdir())
    pattern = f"skill-sandbox-{first.pid}-*"
    wait_for(lambda: any(path.glob("exec-*") for path in root.glob(pattern)), 15, 0.05,
             "the execution's workdir")
    leftovers = list(root.glob(pattern))
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    client.close()
    assert all(path.exists() for path in leftovers)
    alive = Path(tempfile.mkdtemp(prefix=f"skill-sandbox-{os.getpid()}-"))  # a live owner
    unrelated = Path(tempfile.mkdtemp(prefix="skill-sandboxed-"))
    configured = tmp_path / "workdirs"
    configured.mkdir()
    (configured / "exec-deadbeef").mkdir()
    (configured / "exec-deadbeef" / "left.txt").write_text("x")
    (configured / "keep.txt").write_text("not ours")
    try:
        second = start_daemon([sleeper]).start()
        assert not any(path.exists() for path in leftovers)
        assert alive.exists() and unrelated.exists()
        assert second.find_events("swept leftover workdirs")
        assert second.stop() == 0
        third = start_daemon([sleeper], args=["--workdir-root", str(configured)]).start()
        assert not (configured / "exec-deadbeef").exists()
        assert (configured / "keep.txt").read_text() == "not ours"
        assert third.stop() == 0
    finally:
        alive.rmdir()
        unrelated.rmdir()
    thread.join(timeout=30)


def test_execution_log_files_are_created_0600(start_daemon: Callable[..., Daemon]) -> None:
    item = start_daemon([ECHO], umask=0o022).start()
    with item.http() as http:
        assert http.post("/v1/execute", json={"skill_id": "examples/echo"}).json()["status"] \
            == "success"
    files = [item.exec_log, Path(f"{item.exec_log}-wal"), Path(f"{item.exec_log}-shm")]
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert item.stop() == 0
    loose = start_daemon([ECHO], umask=0o022)  # a log made by an older version: tightened
    loose.exec_log.touch(mode=0o644)
    loose.exec_log.chmod(0o644)
    loose.start()
    assert stat.S_IMODE(loose.exec_log.stat().st_mode) == 0o600
    jsonl = start_daemon([ECHO], umask=0o022, args=["--execution-log", "x.jsonl"])
    jsonl.command[jsonl.command.index("x.jsonl")] = str(jsonl.dir / "log" / "x.jsonl")
    jsonl.start()
    assert stat.S_IMODE((jsonl.dir / "log" / "x.jsonl").stat().st_mode) == 0o600


# -- 7. strict input, content types, malformed HTTP, OpenAPI -----------------------------------


@pytest.mark.parametrize(("body", "code", "field"), [
    (b'{"skill_id": "examples/echo", "timeout": true}', 422, "timeout"),
    (b'{"skill_id": "examples/echo", "timeout": "5"}', 422, "timeout"),
    (b'{"skill_id": "examples/echo", "timeout": 1e999}', 400, "timeout"),
    (b'{"skill_id": "examples/echo", "tenant_id": 5}', 422, "tenant_id"),
    (b'{"skill_id": "examples/echo", "input": NaN}', 400, "input"),
    (b'{"skill_id": "examples/echo", "input": {"x": Infinity}}', 400, "input.x"),
    (b'{"skill_id": "examples/echo", "input": [-Infinity]}', 400, "input.0"),
    (b'{"skill_id": "examples/echo", "input": {"big": 1e999}}', 400, "input.big"),
])
def test_lenient_values_are_refused_not_coerced(start_daemon: Callable[..., Daemon], body: bytes,
                                                code: int, field: str) -> None:
    item = start_daemon([ECHO]).start()
    with item.http() as http:
        response = _post_raw(http, "/v1/execute", body)
        assert response.status_code == code, response.text
        assert [problem["field"] for problem in response.json()["problems"]] == [field]
        plan = http.post("/v1/plans", content=b'{"plan": {"steps": []}, "context": '
                         b'{"timeout": true}}', headers=JSON)
        assert plan.status_code == 422
        ok = _post_raw(http, "/v1/execute", b'{"skill_id": "examples/echo", "timeout": 5, '
                       b'"input": {"f": 1.5e300}}')
        assert ok.json()["output"] == {"f": 1.5e300}


def test_content_type_must_be_json_else_415(start_daemon: Callable[..., Daemon]) -> None:
    item = start_daemon([ECHO]).start()
    body = b'{"skill_id": "examples/echo"}'
    with item.http() as http:
        for headers in ({"Content-Type": "text/plain"},
                        {"Content-Type": "application/x-www-form-urlencoded"}, {}):
            for path in ("/v1/execute", "/v1/plans"):
                response = http.post(path, content=body, headers=headers)
                assert response.status_code == 415, (path, headers)
                assert response.json()["code"] == "unsupported_media_type"
        for value in ("application/json", "application/json; charset=utf-8",
                      "Application/JSON"):
            response = http.post("/v1/execute", content=body, headers={"Content-Type": value})
            assert response.json()["status"] == "success", value


def test_malformed_http_and_wrong_methods_get_json_errors(
        start_daemon: Callable[..., Daemon]) -> None:
    item = start_daemon([ECHO], tcp=True).start()
    for sock in (_unix(item), _tcp(item)):
        sock.sendall(b"THIS IS NOT\x00 HTTP\r\n\r\n")
        status, headers, body = _response(_read_all(sock))
        sock.close()
        assert status == 400 and headers["content-type"] == "application/json"
        assert json.loads(body)["code"] == "malformed_http"
    with item.http() as http:
        response = http.get("/v1/execute")
        assert response.status_code == 405
        assert response.headers["allow"] == "POST"
        assert response.json()["code"] == "method_not_allowed"
        response = http.delete("/v1/skills")
        assert response.status_code == 405 and "GET" in response.headers["allow"]


def _validator(document: dict[str, Any], schema: dict[str, Any]) -> Callable[[Any], None]:
    whole = {**schema, "components": document["components"]}

    def check(value: Any) -> None:
        jsonschema.validate(value, whole)

    return check


def test_openapi_document_matches_what_the_server_does(
        start_daemon: Callable[..., Daemon]) -> None:
    """Every response the server gives to a set of valid, invalid and unauthenticated requests
    is listed for its operation, with a body matching the documented schema."""
    item = start_daemon([ECHO], tcp=True).start()
    with item.tcp_http(item.token) as http, item.tcp_http() as anonymous:
        document = http.get("/openapi.json").json()
        limit = next(param for param in document["paths"]["/v1/executions"]["get"]
                     ["parameters"] if param["name"] == "limit")
        assert limit["schema"] == {"type": "integer", "minimum": 1, "maximum": 1000}
        for path, operations in document["paths"].items():
            for method, operation in operations.items():
                if path != "/healthz":
                    assert "401" in operation["responses"], (method, path)
                if "requestBody" in operation:
                    for code in ("400", "413", "415", "422"):
                        assert code in operation["responses"], (method, path, code)
        echo = {"skill_id": "examples/echo"}
        cases: list[tuple[httpx.Client, str, str, dict[str, Any]]] = [
            (http, "post", "/v1/execute", {"json": echo}),
            (http, "post", "/v1/execute", {"json": {"skill_id": "nope/x"}}),
            (http, "post", "/v1/execute", {"content": b"{", "headers": JSON}),
            (http, "post", "/v1/execute", {"json": {"skill_id": 1}}),
            (http, "post", "/v1/execute", {"json": {**echo, "timeout": True}}),
            (http, "post", "/v1/execute", {"content": b"{}", "headers": {"Content-Type":
                                                                         "text/plain"}}),
            (http, "post", "/v1/execute", {"content": b'{"input": "\\ud800"}',
                                           "headers": JSON}),
            (anonymous, "post", "/v1/execute", {"json": echo}),
            (http, "post", "/v1/plans", {"json": {"plan": {"steps": [
                {"name": "examples/echo", "type": "skill", "arguments": {}}]}}}),
            (http, "post", "/v1/plans", {"json": {"plan": {"steps": [{"type": "x"}]}}}),
            (http, "get", "/v1/executions", {"params": {"limit": "5"}}),
            (http, "get", "/v1/executions", {"params": {"limit": "0"}}),
            (http, "get", "/v1/executions", {"params": {"limit": "many"}}),
            (http, "get", "/v1/executions/unknown-id", {}),
            (http, "post", "/v1/executions/unknown-id/cancel", {}),
            (http, "get", "/v1/skills", {}),
            (http, "get", "/v1/skills/examples/echo", {}),
            (http, "get", "/v1/skills/nope/x", {}),
            (http, "get", "/v1/status", {}),
            (anonymous, "get", "/v1/status", {}),
            (anonymous, "get", "/healthz", {}),
            (http, "get", "/readyz", {}),
            (http, "get", "/metrics", {}),
        ]
        for client, method, path, options in cases:
            response = client.request(method, path, **options)
            template = "/v1/skills/{skill_id}" if path.startswith("/v1/skills/") else \
                "/v1/executions/{request_id}/cancel" if path.endswith("/cancel") else \
                "/v1/executions/{request_id}" if path.startswith("/v1/executions/") else path
            operation = document["paths"][template][method]
            code = str(response.status_code)
            assert code in operation["responses"], (method, path, code, response.text)
            content = operation["responses"][code].get("content", {})
            if "application/json" in content:
                _validator(document, content["application/json"]["schema"])(response.json())


# -- 8. the queue in /metrics ------------------------------------------------------------------


def test_queue_depth_and_queue_wait_are_in_metrics(start_daemon: Callable[..., Daemon],
                                                   sleeper: Path) -> None:
    item = start_daemon([sleeper], args=["--max-concurrency", "1"]).start()
    threads = []
    for _ in range(3):
        client = item.client()
        thread = threading.Thread(target=lambda c=client: _run(
            c, "test/sleeper", {"seconds": 1}), daemon=True)
        thread.start()
        threads.append((thread, client))
    with item.http() as http:
        wait_for(lambda: metric(http.get("/metrics").text, "skill_sandbox_queue_depth") == 2,
                 15, 0.02, "two executions queued")
        for thread, client in threads:
            thread.join(timeout=30)
            client.close()
        text = http.get("/metrics").text
    assert metric(text, "skill_sandbox_queue_wait_seconds_count") == 3
    assert metric(text, "skill_sandbox_queue_wait_seconds_sum") > 1.0  # two waited ≥ 1 s
    assert metric(text, "skill_sandbox_queue_depth") == 0
    assert metric(text, "skill_sandbox_queue_limit") == 1 + 64


# -- soak --------------------------------------------------------------------------------------


def _load(item: Daemon, seconds: float, failures: list[str] | None = None
          ) -> tuple[list[float], int]:
    """Steady executions over the Unix socket for `seconds`, two callers; latencies, errors
    (what each failure was goes to `failures`)."""
    latencies: list[float] = []
    errors = [0]
    stop = time.monotonic() + seconds

    def caller() -> None:
        with item.http(timeout=20) as http:
            while time.monotonic() < stop:
                started = time.perf_counter()
                try:
                    response = http.post("/v1/execute", json={"skill_id": "examples/echo",
                                                              "input": {"n": 1}})
                    ok = response.json().get("status") == "success"
                    what = f"{response.status_code} {response.text[:300]}"
                except (httpx.HTTPError, ValueError) as exc:
                    ok, what = False, repr(exc)
                latencies.append(time.perf_counter() - started)
                errors[0] += not ok
                if not ok and failures is not None:
                    failures.append(what)

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 30)
    return latencies, errors[0]


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0


def _hostile(item: Daemon, stop: threading.Event, counts: dict[str, int]) -> None:
    """Idle sockets, trickled headers and stalled bodies over TCP, reopened as they close:
    600 at a time, more than the daemon's whole fd limit."""
    socks: list[socket.socket] = []
    while not stop.is_set():
        try:
            while len(socks) < 600 and not stop.is_set():
                sock = _tcp(item, timeout=5)
                sock.setblocking(False)
                kind = len(socks) % 3
                if kind == 1:
                    sock.send(b"GET /healthz HTTP/1.1\r\n")
                elif kind == 2:
                    sock.send(b"POST /v1/execute HTTP/1.1\r\nContent-Length: 500\r\n\r\n{")
                socks.append(sock)
                counts["opened"] += 1
        except OSError:
            pass
        for sock in list(socks):
            try:
                answer = sock.recv(4096)
                counts["503" if b" 503 " in answer[:16] else "408" if b" 408 " in answer[:16]
                       else "closed"] += 1
                sock.close()  # answered (503/408) or closed: the server dropped it
                socks.remove(sock)
            except BlockingIOError:
                try:
                    sock.send(b"X-Trickle: a\r\n")
                except OSError:
                    sock.close()
                    socks.remove(sock)
            except OSError:
                sock.close()
                socks.remove(sock)
        stop.wait(0.2)
    for sock in socks:
        sock.close()


@pytest.mark.timeout(90)
def test_soak_hostile_connections_beside_a_steady_load(
        start_daemon: Callable[..., Daemon], record_property: Callable[[str, Any], None]) -> None:
    item = start_daemon([ECHO], tcp=True, nofile=512,
                  args=["--max-concurrency", "2", "--header-timeout", "2",
                        "--body-timeout", "2"]).start()
    failures: list[str] = []
    quiet, quiet_errors = _load(item, 5, failures)
    stop = threading.Event()
    counts = {"opened": 0, "503": 0, "408": 0, "closed": 0}
    attacker = threading.Thread(target=_hostile, args=(item, stop, counts), daemon=True)
    attacker.start()
    time.sleep(1)  # let the connections pile up to the listener's bound
    hostile, hostile_errors = _load(item, 5, failures)
    stop.set()
    attacker.join(timeout=30)
    figures = {"quiet_n": len(quiet), "quiet_p99_ms": round(_p99(quiet) * 1000, 2),
               "quiet_errors": quiet_errors, "hostile_n": len(hostile),
               "hostile_p99_ms": round(_p99(hostile) * 1000, 2),
               "hostile_errors": hostile_errors,
               **{f"hostile_connections_{key}": value for key, value in counts.items()}}
    for key, value in figures.items():
        record_property(key, value)
    print("soak:", json.dumps(figures))
    assert quiet_errors == 0 and hostile_errors == 0, failures[:5]
    assert hostile, "the load made no requests beside the hostile connections"
    assert counts["opened"] > 600 and counts["503"] > 0  # it did push past the bound
    assert [line for line in item.log_text().splitlines() if "Traceback" in line] == []
    assert item.stop() == 0
