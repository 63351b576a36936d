"""A Python skill's `ctx.llm_generate` and `ctx.http_fetch`: the same host calls WASM skills
make, answered by the supervisor (the loopback LLM stand-in, the operator's `http_fetch`
tool); the provider's key and the network stay outside the execution."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from llm_stub import Reply, StubLLMServer, completion, running_stub
from loopback_pages import Pages, urllib_fetcher

from sandbox import ExecutionRequest, OpenAICompatibleProvider, Sandbox, Skill

pytestmark = pytest.mark.timeout(60)

LLM_PERMISSION = '[permissions]\nhost = ["llm:generate"]\n'
FETCH_PERMISSION = '[permissions]\nhost = ["http:fetch"]\n'


@pytest.fixture
def stub() -> Iterator[StubLLMServer]:
    yield from running_stub()


def provider(stub: StubLLMServer) -> OpenAICompatibleProvider:
    return OpenAICompatibleProvider(stub.base_url, "stub-model", api_key_env=None)


def execute(sandbox: Sandbox, skill: Skill, data: Any) -> Any:
    return sandbox.execute(ExecutionRequest(skill_id=skill.id, input=json.dumps(data).encode()))


PYTHON_CALLER = '''
def run(input, ctx):
    try:
        if input["call"] == "llm":
            return {"text": ctx.llm_generate(input["prompt"])}
        status, body = ctx.http_fetch(input["url"])
        return {"status": status, "body": body.decode()}
    except ctx.HostCallError as exc:
        return {"refused": str(exc)}
'''


def python_skill(directory: Path, manifest_extra: str = "") -> Skill:
    directory.mkdir()
    (directory / "main.py").write_text(PYTHON_CALLER)
    (directory / "skill.toml").write_text(
        f'id = "test/{directory.name}"\nentrypoint = "main:run"\n{manifest_extra}\n')
    return Skill.from_dir(directory)


def test_a_python_skill_asks_the_supervisors_provider_and_its_tokens_are_counted(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer) -> None:
    stub.reply = Reply(body=completion("bonjour", total_tokens=5))
    skill = python_skill(tmp_path / "py-llm", LLM_PERMISSION)
    sandbox = make_sandbox(skill, warm=True, llm=provider(stub))
    result = execute(sandbox, skill, {"call": "llm", "prompt": "say hi in French"})
    assert result.ok, (result.error, result.stderr)
    assert result.json() == {"text": "bonjour"}
    assert result.resource_usage.tokens_used == 5  # counted by the supervisor, not the skill
    [received] = stub.received
    assert received.body["messages"][0]["content"] == "say hi in French"


def test_a_python_skill_without_the_permission_is_refused_before_asking(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer) -> None:
    skill = python_skill(tmp_path / "py-llm")
    sandbox = make_sandbox(skill, warm=True, llm=provider(stub))
    result = execute(sandbox, skill, {"call": "llm", "prompt": "hi"})
    assert result.ok, (result.error, result.stderr)
    assert "does not grant permission 'llm:generate'" in result.json()["refused"]
    assert stub.received == []


def test_a_python_skill_fetches_through_the_operators_fetcher(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox]) -> None:
    pages = Pages(b"pong")
    try:
        skill = python_skill(tmp_path / "py-fetch", FETCH_PERMISSION)
        sandbox = make_sandbox(skill, warm=True)
        calls: list[dict[str, Any]] = []
        sandbox.register_tool("http_fetch", urllib_fetcher(calls))
        result = execute(sandbox, skill, {"call": "fetch", "url": pages.url})
        assert result.ok, (result.error, result.stderr)
        assert result.json() == {"status": 203, "body": "pong"}
        assert calls == [{"url": pages.url, "method": "GET", "body": ""}]
        # Without a fetcher registered the call fails, naming what is missing.
        bare = make_sandbox(skill, warm=True)
        missing = execute(bare, skill, {"call": "fetch", "url": pages.url})
        assert "http_fetch failed" in missing.json()["refused"], missing.json()
    finally:
        pages.close()
