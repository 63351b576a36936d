"""The daemon's HTTP API, driven with raw HTTP over its Unix socket (one daemon per module).

Bad bodies must be refused with a clear 4xx before any worker is touched; results carry `input`
and `output` as JSON values; metrics and the execution log follow the executions.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from daemon_util import EXAMPLES, Daemon, metric, wait_for, write_skill

MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("skills")
    write_skill(root, "typed", "def run(input):\n    return {'double': input['n'] * 2}\n",
                '[input_schema]\ntype = "object"\nrequired = ["n"]\n'
                '[input_schema.properties.n]\ntype = "integer"\n')
    for name in ("boom", "boom_metrics", "boom_plan"):  # one each: 2 failures open a circuit
        write_skill(root, name, "def run(input):\n    raise ValueError('boom: ' + str(input))\n")
    write_skill(root, "unstable", "def run(input):\n    raise RuntimeError('down')\n")
    write_skill(root, "sleeper", "import time\n\ndef run(input):\n"
                "    time.sleep(input.get('seconds', 0))\n    return 'woke'\n",
                "[limits]\ntimeout = 20\n")
    item = Daemon([EXAMPLES / "echo", root],
                  args=["--max-body-bytes", str(MAX_BODY), "--circuit-failure-threshold", "2",
                        "--circuit-cooldown", "600"])
    try:
        yield item.start()
        assert item.stop() == 0
    finally:
        item.close()


@pytest.fixture
def http(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.http() as client:
        yield client


def _executions(http: httpx.Client, skill: str, status: str) -> float:
    return float(metric(http.get("/metrics").text, "skill_sandbox_executions_total",
                        skill=skill, status=status))


# -- execute -------------------------------------------------------------------------------------


def test_execute_takes_and_returns_json_values(http: httpx.Client) -> None:
    for value in ({"nested": {"list": [1, 2.5, None, True]}}, [1, "two"], "text", 42, None):
        response = http.post("/v1/execute", json={"skill_id": "examples/echo", "input": value})
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "success"
        assert body["output"] == value
        assert body["error"] == ""
        assert set(body) == {"status", "output", "error", "duration", "resource_usage", "stdout",
                             "stderr", "request_id", "skill_id", "error_kind"}
        assert body["error_kind"] == ""
        assert set(body["resource_usage"]) == {"cpu_time_ms", "memory_mb", "tokens_used"}
        assert response.headers["x-request-id"] == body["request_id"]


def test_execute_keeps_the_callers_identities(http: httpx.Client, daemon: Daemon) -> None:
    request_id = f"req-{uuid.uuid4().hex}"
    body = http.post("/v1/execute", json={"skill_id": "examples/echo", "request_id": request_id,
                                          "tenant_id": "acme", "user_id": "u1"}).json()
    assert body["request_id"] == request_id and body["skill_id"] == "examples/echo"
    line = daemon.find_events("execution", request_id=request_id)
    assert line and line[0]["tenant_id"] == "acme" and line[0]["status"] == "success"


def test_skill_failures_and_unknown_skills_are_results_not_http_errors(
        http: httpx.Client) -> None:
    failed = http.post("/v1/execute", json={"skill_id": "test/boom", "input": {"x": 1}})
    unknown = http.post("/v1/execute", json={"skill_id": "nobody/here"})
    assert failed.status_code == 200 and failed.json()["status"] == "failed"
    assert "ValueError: boom: {'x': 1}" in failed.json()["error"]
    assert unknown.status_code == 200 and unknown.json()["status"] == "rejected"
    assert unknown.json()["error"] == "runtime: skill not loaded"


def test_input_not_matching_the_schema_is_rejected_before_a_worker(http: httpx.Client) -> None:
    before = _executions(http, "test/typed", "success")
    bad = http.post("/v1/execute", json={"skill_id": "test/typed", "input": {"n": "two"}})
    good = http.post("/v1/execute", json={"skill_id": "test/typed", "input": {"n": 21}})
    assert bad.json()["status"] == "rejected"
    assert bad.json()["error"].startswith("runtime: invalid input: input does not match "
                                          "input_schema at $.n")
    assert good.json()["output"] == {"double": 42}
    assert _executions(http, "test/typed", "success") == before + 1


@pytest.mark.parametrize(("body", "code", "reason", "field"), [
    (b"", 400, "invalid_body", None),
    (b"{not json", 400, "invalid_body", None),
    (b"[1, 2]", 400, "invalid_body", None),
    (b"\xff\xfe", 400, "invalid_body", None),
    (b'{"input": {}}', 422, "invalid_body", "skill_id"),
    (b'{"skill_id": "examples/echo", "inptu": {}}', 422, "invalid_body", "inptu"),
    (b'{"skill_id": "examples/echo", "timeout": -1}', 422, "invalid_body", "timeout"),
    (b'{"skill_id": "examples/echo", "timeout": "soon"}', 422, "invalid_body", "timeout"),
    (b'{"skill_id": "examples/echo", "request_id": "../../etc"}', 422, "invalid_body",
     "request_id"),
    (b'{"skill_id": 7}', 422, "invalid_body", "skill_id"),
])
def test_malformed_bodies_get_a_clear_4xx_and_never_reach_a_worker(
        http: httpx.Client, daemon: Daemon, body: bytes, code: int, reason: str,
        field: str | None) -> None:
    before = http.get("/metrics").text
    response = http.post("/v1/execute", content=body,
                         headers={"Content-Type": "application/json"})
    assert response.status_code == code
    answer = response.json()
    assert answer["code"] == reason and answer["error"]
    if field is not None:
        assert [problem["field"] for problem in answer["problems"]] == [field]
        assert f"field '{field}'" in answer["error"]
    after = http.get("/metrics").text
    assert metric(after, "skill_sandbox_executions_total", skill="examples/echo",
                  status="success") == metric(before, "skill_sandbox_executions_total",
                                              skill="examples/echo", status="success")
    assert metric(after, "skill_sandbox_rejected_requests_total", reason=reason) == \
        metric(before, "skill_sandbox_rejected_requests_total", reason=reason) + 1
    assert any(event["error"] == answer["error"]
               for event in daemon.find_events("request refused", code=code))


def test_oversized_bodies_are_refused_with_413_declared_or_streamed(
        http: httpx.Client, daemon: Daemon) -> None:
    big = json.dumps({"skill_id": "examples/echo", "input": "x" * MAX_BODY}).encode()
    declared = http.post("/v1/execute", content=big,
                         headers={"Content-Type": "application/json"})

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap applies while reading
        for start in range(0, len(big), 8192):
            yield big[start:start + 8192]

    streamed = http.post("/v1/execute", content=chunks(),
                         headers={"Content-Type": "application/json"})
    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.json()["code"] == "body_too_large"
        assert f"max_body_bytes ({MAX_BODY})" in response.json()["error"]
    assert len(daemon.find_events("request refused", reason="body_too_large")) >= 2
    small = http.post("/v1/execute", json={"skill_id": "examples/echo", "input": "x" * 1000})
    assert small.json()["output"] == "x" * 1000


def test_a_request_id_already_in_flight_is_refused_409(http: httpx.Client,
                                                       daemon: Daemon) -> None:
    request_id = f"dup-{uuid.uuid4().hex}"
    first: dict[str, Any] = {}

    def slow() -> None:
        with daemon.http() as other:
            first["response"] = other.post("/v1/execute", json={
                "skill_id": "test/sleeper", "input": {"seconds": 1.5},
                "request_id": request_id})

    thread = threading.Thread(target=slow)
    thread.start()
    try:
        wait_for(lambda: http.get("/v1/status").json()["inflight"] == 1, what="in flight")
        second = http.post("/v1/execute", json={"skill_id": "examples/echo",
                                                "request_id": request_id})
    finally:
        thread.join(timeout=20)
    assert second.status_code == 409 and second.json()["code"] == "duplicate_request_id"
    assert first["response"].json()["status"] == "success"


def test_cancel_by_request_id(http: httpx.Client, daemon: Daemon) -> None:
    request_id = f"cancel-{uuid.uuid4().hex}"
    outcome: dict[str, Any] = {}

    def slow() -> None:
        with daemon.http() as other:
            outcome["response"] = other.post("/v1/execute", json={
                "skill_id": "test/sleeper", "input": {"seconds": 15},
                "request_id": request_id})

    thread = threading.Thread(target=slow)
    thread.start()
    try:
        wait_for(lambda: http.get("/v1/status").json()["running"] == 1, what="running")
        canceled = http.post(f"/v1/executions/{request_id}/cancel")
    finally:
        thread.join(timeout=20)
    assert canceled.status_code == 200 and canceled.json()["canceled"] is True
    assert outcome["response"].json()["status"] == "canceled"
    missing = http.post("/v1/executions/nothing-here/cancel")
    assert missing.status_code == 404 and missing.json()["code"] == "not_in_flight"


# -- skills, health, openapi ---------------------------------------------------------------------


def test_skills_listing_and_detail(http: httpx.Client) -> None:
    listing = http.get("/v1/skills").json()
    ids = [skill["id"] for skill in listing["skills"]]
    assert ids == sorted(ids) and "examples/echo" in ids and "test/typed" in ids
    assert listing["errors"] == []
    detail = http.get("/v1/skills/test/typed").json()
    assert detail["input_schema"]["required"] == ["n"]
    assert detail["zygote"]["alive"] is True and detail["zygote"]["pid"] > 0
    assert detail["circuit"] == "closed"
    assert detail["limits"]["timeout"] == 30.0
    missing = http.get("/v1/skills/nobody/here")
    assert missing.status_code == 404 and missing.json()["code"] == "skill_not_loaded"


def test_health_readiness_and_routing_errors_are_json(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok", "draining": False}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["zygotes_down"] == []
    not_found = http.get("/v2/nothing")
    wrong_method = http.get("/v1/execute")
    assert not_found.status_code == 404 and not_found.json()["code"] == "not_found"
    assert wrong_method.status_code == 405
    assert wrong_method.json()["code"] == "method_not_allowed"


def test_openapi_document_describes_the_api(http: httpx.Client) -> None:
    document = http.get("/openapi.json").json()
    assert document["openapi"].startswith("3.")
    for path in ("/v1/execute", "/v1/plans", "/v1/skills", "/v1/skills/{skill_id}",
                 "/v1/skills/reload", "/v1/executions/{request_id}", "/healthz", "/readyz",
                 "/metrics"):
        assert path in document["paths"], path
    execute_body = document["components"]["schemas"]["ExecuteBody"]
    assert execute_body["required"] == ["skill_id"]
    assert "413" in document["paths"]["/v1/execute"]["post"]["responses"]


def test_raw_http_over_the_socket_needs_no_client_library(daemon: Daemon) -> None:
    body = b'{"skill_id": "examples/echo", "input": {"from": "raw"}}'
    request = (b"POST /v1/execute HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
               b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
               + b"\r\n\r\n" + body)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(str(daemon.socket))
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(payload)["output"] == {"from": "raw"}


# -- metrics, circuit, execution log -------------------------------------------------------------


def test_metrics_follow_executions(http: httpx.Client) -> None:
    before = http.get("/metrics").text
    for _ in range(3):
        http.post("/v1/execute", json={"skill_id": "examples/echo"})
    http.post("/v1/execute", json={"skill_id": "test/boom_metrics"})
    after = http.get("/metrics").text
    assert http.get("/metrics").headers["content-type"].startswith("text/plain")

    def delta(name: str, **labels: str) -> float:
        return float(metric(after, name, **labels) - metric(before, name, **labels))

    assert delta("skill_sandbox_executions_total", skill="examples/echo", status="success") == 3
    assert delta("skill_sandbox_executions_total", skill="test/boom_metrics",
                 status="failed") == 1
    assert delta("skill_sandbox_execution_duration_seconds_count", skill="examples/echo") == 3
    assert delta("skill_sandbox_execution_cpu_seconds_count", skill="examples/echo") == 3
    assert delta("skill_sandbox_execution_memory_bytes_count", skill="examples/echo") == 3
    assert delta("skill_sandbox_http_requests_total", route="/v1/execute", code="200") == 4
    assert metric(after, "skill_sandbox_zygote_up", skill="examples/echo") == 1
    assert metric(after, "skill_sandbox_queue_depth") == 0
    assert metric(after, "skill_sandbox_skills_loaded") == 7


def test_circuit_opens_after_repeated_failures_and_shows_everywhere(
        http: httpx.Client) -> None:
    results = [http.post("/v1/execute", json={"skill_id": "test/unstable"}).json()
               for _ in range(3)]
    assert [result["status"] for result in results] == ["failed", "failed", "rejected"]
    assert results[2]["error"] == "runtime: circuit breaker open"
    assert http.get("/v1/skills/test/unstable").json()["circuit"] == "open"
    status = {skill["id"]: skill for skill in http.get("/v1/status").json()["skills"]}
    assert status["test/unstable"]["circuit"] == "open"
    text = http.get("/metrics").text
    assert metric(text, "skill_sandbox_circuit_state", skill="test/unstable", state="open") == 1
    assert metric(text, "skill_sandbox_circuit_state", skill="examples/echo",
                  state="closed") == 1


def test_execution_log_is_queryable_by_request_id_and_filters(http: httpx.Client) -> None:
    request_id = f"log-{uuid.uuid4().hex}"
    http.post("/v1/execute", json={"skill_id": "examples/echo", "request_id": request_id,
                                   "tenant_id": "tenant-log", "input": {"k": "v"}})
    one = http.get(f"/v1/executions/{request_id}").json()
    assert one["request_id"] == request_id
    [record] = one["records"]
    assert record["status"] == "success" and record["step_name"] == "examples/echo"
    assert record["tenant_id"] == "tenant-log" and record["output"] == {"k": "v"}
    filtered = http.get("/v1/executions", params={"tenant_id": "tenant-log",
                                                  "status": "success", "since": "1h"}).json()
    assert [item["request_id"] for item in filtered["records"]] == [request_id]
    assert http.get("/v1/executions/never-ran").status_code == 404
    bad = http.get("/v1/executions", params={"since": "yesterday-ish"})
    assert bad.status_code == 400 and "since" in bad.json()["error"]
    assert http.get("/v1/executions", params={"limit": "0"}).status_code == 400


# -- plans ---------------------------------------------------------------------------------------


def _plan(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"plan": {"assistant_id": "assistant-1", "steps": list(steps)},
            "context": {"tenant_id": "acme", "timeout": 20}}


def test_plan_passes_data_between_steps(http: httpx.Client) -> None:
    response = http.post("/v1/plans", json=_plan(
        {"name": "examples/echo", "type": "skill", "arguments": {"n": 4}},
        {"name": "test/typed", "type": "skill", "arguments": {"n": "{{examples/echo.n}}"}}))
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success" and body["error"] == ""
    assert [step["output"] for step in body["steps"]] == [{"n": 4}, {"double": 8}]
    assert body["steps"][1]["execution"]["request_id"] == body["request_id"]
    assert body["assistant_id"] == "assistant-1"
    logged = http.get(f"/v1/executions/{body['request_id']}").json()["records"]
    assert [record["step_type"] for record in logged].count("skill") == 2


def test_a_failing_step_stops_the_plan_and_is_named(http: httpx.Client) -> None:
    body = http.post("/v1/plans", json=_plan(
        {"name": "examples/echo", "type": "skill", "arguments": {}},
        {"name": "test/boom_plan", "type": "skill", "arguments": {}},
        {"name": "examples/echo", "type": "skill", "arguments": {}})).json()
    assert body["status"] == "failed"
    assert body["error"].startswith("runtime: plan failed: steps[1] 'test/boom_plan'")
    assert [step["step_name"] for step in body["steps"]] == ["examples/echo", "test/boom_plan"]


@pytest.mark.parametrize(("steps", "message"), [
    ([], "the plan has no steps"),
    ([{"name": "nobody/here", "type": "skill", "arguments": {}}], "is not loaded"),
    ([{"name": "examples/echo", "type": "skill", "arguments": {"x": "{{later}}"}},
      {"name": "later", "type": "tool", "arguments": {}}], "steps[0]"),
    ([{"name": "examples/echo", "type": "magic", "arguments": {}}], "unknown type"),
])
def test_invalid_plans_are_refused_422_before_any_step(
        http: httpx.Client, steps: list[dict[str, Any]], message: str) -> None:
    response = http.post("/v1/plans", json=_plan(*steps))
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_plan"
    assert message in response.json()["error"]


def test_openbotstack_dialect_plan_runs_over_http_and_the_default_refuses_it(
        http: httpx.Client) -> None:
    steps: list[dict[str, Any]] = [
        {"name": "examples/echo", "type": "skill", "arguments": {"n": "4"}, "step_id": "s1",
         "timeout_ms": 10000},
        {"name": "test/typed", "type": "skill", "arguments": {"n": "{{examples/echo.n}}"}}]
    body = http.post("/v1/plans", json={**_plan(steps[0]), "dialect": "openbotstack"}).json()
    assert body["status"] == "success"
    assert [step["output"] for step in body["steps"]] == [{"n": 4}]  # "4" coerced, as in Go
    refused = http.post("/v1/plans", json=_plan(*steps))
    assert refused.status_code == 422 and "unknown field(s) step_id" in refused.json()["error"]


def test_plan_body_is_validated(http: httpx.Client) -> None:
    response = http.post("/v1/plans", json={"plan": {"steps": []}, "context": {"timeout": -5}})
    assert response.status_code == 422
    assert response.json()["problems"][0]["field"] == "context.timeout"


@pytest.mark.parametrize(("extra", "field"), [
    ({"retry": {"max_retries": -1}}, "retry.max_retries"),
    ({"retry": {"initial_backoff": 1e9}}, "retry.initial_backoff"),
    ({"step_retry": {"examples/echo": {"fallback_tool": 7}}},
     "step_retry.examples/echo.fallback_tool"),
    ({"retry": {"max_retries": 1, "jitter": True}}, "retry.jitter"),
])
def test_retry_policies_in_the_plan_body_are_validated_field_by_field(
        http: httpx.Client, extra: dict[str, Any], field: str) -> None:
    body = {**_plan({"name": "examples/echo", "type": "skill", "arguments": {}}), **extra}
    response = http.post("/v1/plans", json=body)
    assert response.status_code == 422, response.text
    assert [problem["field"] for problem in response.json()["problems"]] == [field]


def test_reload_endpoint_reports_unchanged_skills(http: httpx.Client) -> None:
    report = http.post("/v1/skills/reload").json()
    assert report["added"] == [] and report["removed"] == [] and report["errors"] == []
    assert "examples/echo" in report["unchanged"]
