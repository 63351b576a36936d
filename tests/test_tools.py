"""Tools: the registry, and openbotstack's HTTP tool runner against a real server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from tool_registry import serve_registry

from sandbox import (
    ExecutionContext,
    ExecutionPlan,
    ExecutionStep,
    HttpToolRunner,
    PlanFailed,
    Sandbox,
    ToolContext,
    ToolError,
)
from sandbox.tools import ToolRegistry


@pytest.fixture
def registry_server() -> Iterator[ThreadingHTTPServer]:
    with serve_registry() as server:
        yield server


@pytest.fixture
def runner(registry_server: ThreadingHTTPServer) -> Iterator[HttpToolRunner]:
    port = registry_server.server_address[1]
    http_runner = HttpToolRunner(f"http://127.0.0.1:{port}/", max_response_bytes=4096)
    yield http_runner
    http_runner.close()


def _ctx(tool: str, timeout: float | None = 5.0) -> ToolContext:
    return ToolContext(tool=tool, request_id="req-1", tenant_id="acme", user_id="u7",
                       timeout=timeout)


def test_http_tool_posts_openbotstack_invoke_body(runner: HttpToolRunner,
                                                  registry_server: ThreadingHTTPServer) -> None:
    output = runner.run({"q": "weather", "n": 2}, _ctx("search"))
    assert output == {"tool": "search", "echo": {"q": "weather", "n": 2},
                      "meta": {"tenant_id": "acme", "user_id": "u7", "request_id": "req-1"}}
    path, body = registry_server.received[0]  # type: ignore[attr-defined]
    assert path == "/invoke"
    assert body == {"tool": "search", "arguments": {"q": "weather", "n": 2},
                    "meta": {"tenant_id": "acme", "user_id": "u7", "request_id": "req-1"}}


@pytest.mark.parametrize(("tool", "message"), [
    ("broken", "tool 'broken': quota exceeded"),
    ("http500", "tool 'http500': the tool registry answered HTTP 500: registry exploded"),
    ("garbage", "tool 'garbage': the response is not JSON"),
    ("huge", "tool 'huge': the response from http://127.0.0.1"),
])
def test_http_tool_errors_are_tool_errors(runner: HttpToolRunner, tool: str,
                                          message: str) -> None:
    with pytest.raises(ToolError) as caught:
        runner.run({}, _ctx(tool))
    assert message in caught.value.detail


def test_http_tool_is_bounded_by_the_time_left(runner: HttpToolRunner) -> None:
    with pytest.raises(ToolError) as caught:
        runner.run({}, _ctx("slow", timeout=0.3))
    assert caught.value.detail.startswith("runtime: execution timeout: tool 'slow' did not answer")


def test_http_tool_unreachable_registry_is_a_tool_error() -> None:
    dead = HttpToolRunner("http://127.0.0.1:9")
    try:
        with pytest.raises(ToolError, match=r"cannot reach http://127\.0\.0\.1:9/invoke"):
            dead.run({}, _ctx("search"))
    finally:
        dead.close()


def test_http_tool_async_call(runner: HttpToolRunner) -> None:
    output = asyncio.run(runner.arun({"x": 1}, _ctx("calc")))
    assert output["echo"] == {"x": 1}
    with pytest.raises(ToolError, match="quota exceeded"):
        asyncio.run(runner.arun({}, _ctx("broken")))


def test_base_url_must_be_http() -> None:
    with pytest.raises(ValueError, match="base_url must be an http"):
        HttpToolRunner("ftp://example/")


def test_http_tool_in_a_plan_between_two_skills(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path],
        runner: HttpToolRunner) -> None:
    sandbox = make_sandbox(
        skill_dir("def run(input):\n    return {'city': input['city'].title()}\n",
                  skill_id="t/city"),
        skill_dir("def run(input):\n    return {'report': 'got ' + repr(input)}\n",
                  skill_id="t/report"))
    sandbox.register_tool("weather.lookup", runner)
    plan = ExecutionPlan("asst", [
        ExecutionStep("t/city", "skill", {"city": "oslo"}),
        ExecutionStep("weather.lookup", "tool", {"city": "{{t/city.city}}"}),
        ExecutionStep("t/report", "skill", {"tenant": "{{weather.lookup.meta.tenant_id}}",
                                             "city": "{{weather.lookup.echo.city}}"}),
    ])
    ec = ExecutionContext(request_id="plan-1", tenant_id="acme", user_id="u7", timeout=20)
    results = sandbox.execute_plan(plan, ec)
    assert results[1].output["echo"] == {"city": "Oslo"}
    assert results[1].output["meta"] == {"tenant_id": "acme", "user_id": "u7",
                                         "request_id": "plan-1"}
    assert results[2].output == {"report": "got {'tenant': 'acme', 'city': 'Oslo'}"}

    sandbox.register_tool("broken", runner)
    with pytest.raises(PlanFailed, match="tool 'broken': quota exceeded"):
        sandbox.execute_plan(ExecutionPlan("asst", [ExecutionStep("broken", "tool", {})]))


def test_registry_rejects_bad_names_and_non_callables() -> None:
    registry = ToolRegistry()
    with pytest.raises(ValueError, match="non-empty string without whitespace"):
        registry.register("web search", lambda a: a)
    with pytest.raises(ValueError, match="may not contain"):
        registry.register("a{{b", lambda a: a)
    with pytest.raises(TypeError, match="a tool must be callable, got int"):
        registry.register("n", 3)  # type: ignore[arg-type]
    registry.register("ok", lambda a: a)
    assert registry.names() == ["ok"] and "ok" in registry
    registry.unregister("ok")
    with pytest.raises(ToolError, match="tool 'ok' is not registered"):
        registry.call("ok", {}, _ctx("ok"))


def test_async_callable_object_is_awaited() -> None:
    class Adder:
        async def __call__(self, arguments: dict[str, Any]) -> int:
            return int(arguments["a"]) + 1

    registry = ToolRegistry()
    registry.register("add", Adder())
    assert registry.call("add", {"a": 1}, _ctx("add")) == 2
    assert asyncio.run(registry.acall("add", {"a": 2}, _ctx("add"))) == 3
