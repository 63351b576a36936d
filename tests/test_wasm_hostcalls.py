"""A WASM skill's `llm_generate` and `http_fetch`, answered by the supervisor: the LLM provider
(the loopback stand-in of `tests/llm_stub.py`) and the operator's fetcher (a tool named
`http_fetch`) are called in the test process, never in the execution child."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from llm_stub import Reply, StubLLMServer, completion, running_stub
from loopback_pages import Pages, urllib_fetcher

from sandbox import (
    ErrorKind,
    ExecutionRequest,
    ExecutionStatus,
    OpenAICompatibleProvider,
    Sandbox,
    Skill,
)

wasmtime = pytest.importorskip("wasmtime")
pytestmark = pytest.mark.timeout(60)

LLM_PERMISSION = '[permissions]\nhost = ["llm:generate"]\n'
FETCH_PERMISSION = '[permissions]\nhost = ["http:fetch"]\n'

#: The JSON input is the prompt; the model's text is the output ("failed" when the call fails).
LLM_ECHO = """(module
  (import "env" "get_input_len" (func $len (result i32)))
  (import "env" "get_input" (func $in (param i32) (result i32)))
  (import "env" "set_output" (func $set (param i32 i32)))
  (import "env" "llm_generate" (func $llm (param i32 i32 i32) (result i32)))
  (memory (export "memory") 4)
  (data (i32.const 200000) "\\"failed\\"")
  (func (export "execute") (local $n i32) (local $r i32)
    (local.set $n (call $len))
    (drop (call $in (i32.const 0)))
    (local.set $r (call $llm (i32.const 0) (local.get $n) (i32.const 65536)))
    (if (i32.eq (local.get $r) (i32.const -1))
      (then (call $set (i32.const 200000) (i32.const 8)) (return)))
    (call $set (i32.const 65536) (local.get $r))))"""

#: GETs the URL given as input; traps unless the status is 203; answers the fetched body.
FETCH_ECHO = """(module
  (import "env" "get_input_len" (func $len (result i32)))
  (import "env" "get_input" (func $in (param i32) (result i32)))
  (import "env" "set_output" (func $set (param i32 i32)))
  (import "env" "http_fetch"
    (func $fetch (param i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 4)
  (data (i32.const 60000) "GET")
  (func (export "execute") (local $r i32)
    (drop (call $in (i32.const 0)))
    ;; the input is a JSON string: the URL without its quotes
    (local.set $r (call $fetch (i32.const 1) (i32.sub (call $len) (i32.const 2))
                               (i32.const 60000) (i32.const 3) (i32.const 0) (i32.const 0)
                               (i32.const 65536)))
    (if (i32.ne (i32.shr_u (local.get $r) (i32.const 16)) (i32.const 203))
      (then unreachable))
    (call $set (i32.const 65540) (i32.and (local.get $r) (i32.const 0xFFFF)))))"""


def wasm_skill(directory: Path, wat: str, manifest_extra: str = "") -> Skill:
    directory.mkdir()
    (directory / "main.wasm").write_bytes(wasmtime.wat2wasm(wat))
    (directory / "skill.toml").write_text(
        f'id = "test/{directory.name}"\nwasm = "main.wasm"\n{manifest_extra}\n')
    return Skill.from_dir(directory)


def provider(stub: StubLLMServer) -> OpenAICompatibleProvider:
    return OpenAICompatibleProvider(stub.base_url, "stub-model", api_key_env=None)


def execute(sandbox: Sandbox, skill: Skill, data: Any) -> Any:
    return sandbox.execute(ExecutionRequest(skill_id=skill.id, input=json.dumps(data).encode()))


@pytest.fixture
def stub() -> Iterator[StubLLMServer]:
    yield from running_stub()


def test_llm_generate_reaches_the_provider_and_reports_its_tokens(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer) -> None:
    stub.reply = Reply(body=completion('{"answer": "hi"}', total_tokens=7))
    skill = wasm_skill(tmp_path / "llm", LLM_ECHO, LLM_PERMISSION)
    sandbox = make_sandbox(skill, warm=True, llm=provider(stub))
    result = execute(sandbox, skill, "say hi")
    assert result.ok, (result.error, result.stderr)
    assert result.json() == {"answer": "hi"}
    assert result.resource_usage.tokens_used == 7
    [received] = stub.received
    assert received.body["messages"][0]["content"] == '"say hi"'


def test_llm_generate_without_permission_never_reaches_the_provider(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer) -> None:
    skill = wasm_skill(tmp_path / "llm", LLM_ECHO)
    sandbox = make_sandbox(skill, warm=True, llm=provider(stub))
    result = execute(sandbox, skill, "say hi")
    assert result.json() == "failed"
    assert "llm_generate refused" in result.stderr and "'llm:generate'" in result.stderr
    assert stub.received == []
    assert result.resource_usage.tokens_used == 0


def test_llm_generate_without_a_provider_fails_naming_it(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox]) -> None:
    skill = wasm_skill(tmp_path / "llm", LLM_ECHO, LLM_PERMISSION)
    result = execute(make_sandbox(skill, warm=True), skill, "say hi")
    assert result.ok and result.json() == "failed"  # openbotstack's error value to the module
    assert "llm_generate failed: no LLM provider is configured" in result.stderr


def test_provider_error_is_the_calls_failure_on_stderr(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer) -> None:
    stub.reply = Reply(body={"error": {"message": "model overloaded"}}, status=503)
    skill = wasm_skill(tmp_path / "llm", LLM_ECHO, LLM_PERMISSION)
    sandbox = make_sandbox(skill, warm=True, llm=provider(stub))
    result = execute(sandbox, skill, "say hi")
    assert result.json() == "failed"
    assert "HTTP 503: model overloaded" in result.stderr


def test_a_slow_provider_ends_as_the_executions_timeout(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer) -> None:
    """The wall deadline covers the time the module waits for its host call."""
    stub.reply = Reply(body=completion('"late"'), delay=60)
    skill = wasm_skill(tmp_path / "llm", LLM_ECHO,
                       LLM_PERMISSION + "[limits]\ntimeout = 2.0\n")
    sandbox = make_sandbox(skill, warm=True, llm=provider(stub))
    result = execute(sandbox, skill, "say hi")
    assert result.status is ExecutionStatus.TIMEOUT, (result.error, result.stderr)
    assert result.error_kind is ErrorKind.TIMEOUT
    assert len(stub.received) == 1


def test_http_fetch_goes_through_the_operators_fetcher(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox]) -> None:
    pages = Pages(b'{"pong": true}')
    try:
        skill = wasm_skill(tmp_path / "fetch", FETCH_ECHO, FETCH_PERMISSION)
        sandbox = make_sandbox(skill, warm=True)
        calls: list[dict[str, Any]] = []
        sandbox.register_tool("http_fetch", urllib_fetcher(calls))
        result = execute(sandbox, skill, pages.url)
        assert result.ok, (result.error, result.stderr)
        assert result.json() == {"pong": True}
        assert calls == [{"url": pages.url, "method": "GET", "body": ""}]
    finally:
        pages.close()


def test_http_fetch_without_a_fetcher_fails_naming_the_tool(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox]) -> None:
    skill = wasm_skill(tmp_path / "fetch", FETCH_ECHO, FETCH_PERMISSION)
    result = execute(make_sandbox(skill, warm=True), skill, "http://127.0.0.1:9/")
    assert result.status is ExecutionStatus.FAILED  # the module traps on the error value
    assert "http_fetch failed: no HTTP fetcher is configured" in result.stderr
    assert "'http_fetch'" in result.stderr

