"""Declarative skills and plans' `llm` steps, run through an operator-configured LLM provider.

The provider here is a stand-in server on loopback speaking the OpenAI chat-completions wire
format (`tests/llm_stub.py`), or a Python callable. Each test says what the caller gets back:
the model's JSON with `tokens_used` from the provider's usage, or a clear failure naming what
went wrong (HTTP status and the provider's message, a reply that is not JSON or not the
skill's output, the deadline, a missing provider) — and never the API key.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from llm_stub import Reply, StubLLMServer, completion, running_stub

from sandbox import (
    ExecutionContext,
    ExecutionPlan,
    ExecutionRequest,
    InMemoryCircuitBreaker,
    InvalidPlan,
    OpenAICompatibleProvider,
    PlanFailed,
    Sandbox,
    Skill,
)
from sandbox.errors import WorkerFailure
from sandbox.execlog.records import ExecutionLogRecord
from sandbox.llm import LLMCall
from tests.conftest import OPENBOTSTACK
from worker.protocol import ErrorKind, ExecutionStatus

pytestmark = pytest.mark.timeout(30)

REFERENCE = OPENBOTSTACK
KEY_ENV = "SKILL_SANDBOX_TEST_LLM_KEY"
KEY = "sk-test-0f9e8d7c6b5a4321-never-to-be-seen"
SUMMARY_SCHEMA = {"type": "object", "required": ["summary"],
                  "properties": {"summary": {"type": "array", "items": {"type": "string"}}}}
SUMMARIZE = "Summarize as {\"summary\": [...]}.\nText to summarize:\n{{.Input}}\n"


def toml_value(value: Any) -> str:
    """A JSON value as TOML (strings as JSON strings, which TOML reads the same)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return json.dumps(value)


def declarative_skill(directory: Path, *, skill_id: str = "llm/summarize",
                      instructions: str = SUMMARIZE,
                      output_schema: dict[str, Any] | None = SUMMARY_SCHEMA,
                      input_schema: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Skill:
    """A native (skill.toml) declarative skill: `instructions` is its prompt template."""
    lines = [f"id = {json.dumps(skill_id)}", f"instructions = {json.dumps(instructions)}"]
    if output_schema is not None:
        lines.append(f"output_schema = {toml_value(output_schema)}")
    if input_schema is not None:
        lines.append(f"input_schema = {toml_value(input_schema)}")
    if timeout is not None:
        lines.append(f"limits = {{timeout = {timeout}}}")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "skill.toml").write_text("\n".join(lines) + "\n")
    return Skill.from_dir(directory)


class RecordingLogger:
    """An execution logger that keeps its records (and the plan events) in memory."""

    def __init__(self) -> None:
        self.records: list[ExecutionLogRecord] = []

    def log_step(self, record: ExecutionLogRecord) -> None:
        self.records.append(record)

    def log_plan_start(self, ec: ExecutionContext, plan: ExecutionPlan) -> None:
        return

    def log_plan_end(self, ec: ExecutionContext, error: str | None,
                     status: ExecutionStatus) -> None:
        return


@pytest.fixture
def stub() -> Iterator[StubLLMServer]:
    yield from running_stub()


@pytest.fixture
def provider(stub: StubLLMServer, monkeypatch: pytest.MonkeyPatch
             ) -> Iterator[OpenAICompatibleProvider]:
    monkeypatch.setenv(KEY_ENV, KEY)
    made = OpenAICompatibleProvider(stub.base_url, "stub-model", api_key_env=KEY_ENV)
    yield made
    made.close()


def request(skill_id: str = "llm/summarize", data: Any = None, **extra: Any
            ) -> ExecutionRequest:
    payload = {"text": "The cat sat on the mat."} if data is None else data
    return ExecutionRequest(skill_id=skill_id, input=json.dumps(payload).encode(), **extra)


# -- success -------------------------------------------------------------------------------------


def test_declarative_skill_answers_with_the_models_json_and_the_providers_token_count(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer,
        provider: OpenAICompatibleProvider) -> None:
    stub.reply = Reply(completion('{"summary": ["a cat", "a mat"]}', total_tokens=42))
    sandbox = make_sandbox(declarative_skill(tmp_path / "s"), llm=provider)

    result = sandbox.execute(request(data={"text": "The cat sat on the mat."}))

    assert result.status is ExecutionStatus.SUCCESS, result.error
    assert result.json() == {"summary": ["a cat", "a mat"]}
    assert result.resource_usage.tokens_used == 42
    [sent] = stub.received
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["Authorization"] == f"Bearer {KEY}"
    assert sent.body["model"] == "stub-model"
    # {{.Input}} is the input's JSON text, as openbotstack's strings.ReplaceAll gives it
    assert sent.body["messages"] == [{"role": "user", "content": SUMMARIZE.replace(
        "{{.Input}}", '{"text": "The cat sat on the mat."}')}]


def test_a_declarative_skill_loaded_warm_starts_no_worker_process(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox],
        provider: OpenAICompatibleProvider, skill_dir: Callable[..., Path]) -> None:
    from conftest import zygotes_below

    before = zygotes_below()
    sandbox = make_sandbox(declarative_skill(tmp_path / "s"), llm=provider, warm=True)
    assert sandbox.can_execute("llm/summarize")
    assert zygotes_below() == before
    assert sandbox.zygote_info("llm/summarize")["pid"] == 0
    # control: a Python skill loaded warm into the same sandbox does start its zygote
    sandbox.load_skill(skill_dir("def run(input):\n    return input\n"), warm=True)
    assert len(zygotes_below() - before) == 1


@pytest.mark.skipif(not OPENBOTSTACK.is_dir(), reason=f"openbotstack's skills are not at "
                                                      f"{OPENBOTSTACK}")
def test_openbotstack_summarize_prompt_runs_as_written(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer,
        provider: OpenAICompatibleProvider) -> None:
    """runtime-head/summarize's SKILL.md body and manifest.yaml schemas, carried into a
    skill.toml (the SKILL.md mapping itself is the manifest loader's work)."""
    source = REFERENCE / "runtime-head" / "summarize"
    body = (source / "SKILL.md").read_text().split("---", 2)[2].lstrip("\n")
    manifest = yaml.safe_load((source / "manifest.yaml").read_text())
    skill = declarative_skill(tmp_path / "s", skill_id="summarize", instructions=body,
                              input_schema=manifest["input_schema"],
                              output_schema=manifest["output_schema"])
    stub.reply = Reply(completion('{"summary": ["Revenue grew 12%."]}', total_tokens=120))
    sandbox = make_sandbox(skill, llm=provider)

    result = sandbox.execute(request("summarize", {"text": "Revenue grew 12% this quarter."}))

    assert result.ok, result.error
    assert result.json() == {"summary": ["Revenue grew 12%."]}
    assert result.resource_usage.tokens_used == 120
    prompt = stub.received[0].body["messages"][0]["content"]
    assert prompt.startswith("You are a precise summarization assistant.")
    assert prompt.endswith('Text to summarize:\n{"text": "Revenue grew 12% this quarter."}\n')
    # the input schema applies before any call: a request without `text` never reaches it
    rejected = sandbox.execute(request("summarize", {"focus": "numbers"}))
    assert rejected.status is ExecutionStatus.REJECTED
    assert rejected.error_kind is ErrorKind.INVALID_INPUT
    assert len(stub.received) == 1


@pytest.mark.skipif(not OPENBOTSTACK.is_dir(), reason=f"openbotstack's skills are not at "
                                                      f"{OPENBOTSTACK}")
@pytest.mark.parametrize(("directory", "data", "reply"), [
    ("runtime-head/summarize", {"text": "Revenue grew 12% this quarter."},
     {"summary": ["Revenue grew 12%."]}),
    ("runtime-head/classify", {"text": "The invoice is overdue.", "categories": ["billing", "bug"]},
     {"classifications": [{"category": "billing", "confidence": 0.93}], "explanation": "invoice"}),
])
def test_openbotstack_declarative_directories_run_as_they_are(
        make_sandbox: Callable[..., Sandbox], stub: StubLLMServer,
        provider: OpenAICompatibleProvider, directory: str, data: Any, reply: Any) -> None:
    """The SKILL.md-first directories, loaded from openbotstack's own files: with a provider
    they answer its JSON; without one they fail naming the missing provider."""
    skill = Skill.from_dir(OPENBOTSTACK / directory)
    stub.reply = Reply(completion(json.dumps(reply), total_tokens=77))
    with_provider = make_sandbox(skill, llm=provider)

    result = with_provider.execute(request(skill.id, data))

    assert result.ok, result.error
    assert result.json() == reply
    assert result.resource_usage.tokens_used == 77
    prompt = stub.received[0].body["messages"][0]["content"]
    assert json.dumps(data) in prompt and "{{.Input}}" not in prompt
    without = make_sandbox(skill).execute(request(skill.id, data))
    assert without.status is ExecutionStatus.FAILED
    assert "needs an LLM provider, but none is configured" in without.error, without.error
    assert len(stub.received) == 1


# -- failures ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "message"), [
    (500, "The server had an error while processing your request."),
    (401, "Invalid authentication credentials."),
    (429, "Rate limit reached for requests."),
])
def test_a_provider_http_error_fails_naming_the_status_and_the_providers_message(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer,
        provider: OpenAICompatibleProvider, status: int, message: str) -> None:
    stub.reply = Reply({"error": {"message": message, "type": "server_error"}}, status=status)
    sandbox = make_sandbox(declarative_skill(tmp_path / "s"), llm=provider)

    result = sandbox.execute(request())

    assert result.status is ExecutionStatus.FAILED
    assert result.error_kind is ErrorKind.WORKER_FAILURE  # the provider's, not the skill's
    assert f"HTTP {status}: {message}" in result.error
    assert stub.base_url in result.error and "stub-model" in result.error
    with pytest.raises(WorkerFailure):
        result.raise_for_status()


def test_an_unreachable_provider_fails_naming_it(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox],
        monkeypatch: pytest.MonkeyPatch) -> None:
    stopped = StubLLMServer()  # bound, never started, then closed: nothing listens there
    url = stopped.base_url
    stopped.server.server_close()
    monkeypatch.setenv(KEY_ENV, KEY)
    provider = OpenAICompatibleProvider(url, "stub-model", api_key_env=KEY_ENV)
    sandbox = make_sandbox(declarative_skill(tmp_path / "s"), llm=provider)

    result = sandbox.execute(request())
    provider.close()

    assert result.status is ExecutionStatus.FAILED
    assert result.error_kind is ErrorKind.WORKER_FAILURE
    assert url in result.error and "ConnectError" in result.error


@pytest.mark.parametrize(("body", "expected"), [
    (b"<html>502 Bad Gateway</html>", "the response body is not JSON"),
    ({"object": "chat.completion", "choices": []}, "no choices[0].message.content"),
    ({"choices": [{"message": {"content": None}}]}, "no choices[0].message.content"),
])
def test_a_response_that_is_not_chat_completions_fails_naming_what_is_wrong(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer,
        provider: OpenAICompatibleProvider, body: Any, expected: str) -> None:
    stub.reply = Reply(body)
    sandbox = make_sandbox(declarative_skill(tmp_path / "s"), llm=provider)

    result = sandbox.execute(request())

    assert result.status is ExecutionStatus.FAILED
    assert result.error_kind is ErrorKind.WORKER_FAILURE
    assert expected in result.error


def test_a_response_larger_than_the_bound_fails_without_being_read_whole(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    provider = OpenAICompatibleProvider(stub.base_url, "stub-model", api_key_env=KEY_ENV,
                                        max_response_bytes=10_000)
    stub.reply = Reply(completion(json.dumps({"summary": ["x" * 50_000]})))
    sandbox = make_sandbox(declarative_skill(tmp_path / "s"), llm=provider)

    result = sandbox.execute(request())
    provider.close()

    assert result.status is ExecutionStatus.FAILED
    assert "response larger than 10000 bytes" in result.error


@pytest.mark.parametrize(("content", "expected"), [
    ("Sure! Here is the summary: the cat sat.", "the model's reply is not JSON"),
    ('```json\n{"summary": ["a"]}\n```', "Markdown code fence"),
])
def test_a_reply_that_is_not_json_fails_as_the_skills_invalid_output(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer,
        provider: OpenAICompatibleProvider, content: str, expected: str) -> None:
    stub.reply = Reply(completion(content, total_tokens=9))
    sandbox = make_sandbox(declarative_skill(tmp_path / "s"), llm=provider)

    result = sandbox.execute(request())

    assert result.status is ExecutionStatus.FAILED
    assert result.error_kind is ErrorKind.SKILL_FAILED
    assert result.error.startswith("invalid output: ") and expected in result.error
    assert result.output == b""
    assert result.resource_usage.tokens_used == 9  # the call still cost its tokens


def test_a_reply_that_does_not_match_the_output_schema_fails(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer,
        provider: OpenAICompatibleProvider) -> None:
    stub.reply = Reply(completion('{"summary": "one string, not a list"}'))
    sandbox = make_sandbox(declarative_skill(tmp_path / "s"), llm=provider)

    result = sandbox.execute(request())

    assert result.status is ExecutionStatus.FAILED
    assert result.error_kind is ErrorKind.SKILL_FAILED
    assert "does not match output_schema" in result.error


def test_a_reply_larger_than_max_output_bytes_is_resource_exhausted(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer,
        provider: OpenAICompatibleProvider) -> None:
    directory = tmp_path / "s"
    declarative_skill(directory, output_schema=None)
    with (directory / "skill.toml").open("a") as manifest:
        manifest.write("limits = {max_output_bytes = 100}\n")
    stub.reply = Reply(completion(json.dumps({"summary": ["y" * 500]})))
    sandbox = make_sandbox(Skill.from_dir(directory), llm=provider)

    result = sandbox.execute(request())

    assert result.status is ExecutionStatus.FAILED
    assert result.error_kind is ErrorKind.RESOURCE_EXHAUSTED
    assert "output" in result.error and "limit is 100" in result.error


def test_a_provider_slower_than_the_skills_timeout_is_a_timeout(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer,
        provider: OpenAICompatibleProvider) -> None:
    stub.reply = Reply(completion('{"summary": []}'), delay=60)
    sandbox = make_sandbox(declarative_skill(tmp_path / "s", timeout=0.5), llm=provider)

    result = sandbox.execute(request())

    assert result.status is ExecutionStatus.TIMEOUT
    assert result.error_kind is ErrorKind.TIMEOUT
    assert result.error == "runtime: execution timeout after 0.5s"
    assert len(stub.received) == 1  # it did ask, and stopped waiting at the deadline


def test_a_request_timeout_shorter_than_the_skills_bounds_the_call(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer,
        provider: OpenAICompatibleProvider) -> None:
    stub.reply = Reply(completion('{"summary": []}'), delay=60)
    sandbox = make_sandbox(declarative_skill(tmp_path / "s"), llm=provider)

    result = sandbox.execute(request(timeout=0.3))

    assert result.status is ExecutionStatus.TIMEOUT


def test_cancel_stops_waiting_for_the_provider(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer,
        provider: OpenAICompatibleProvider) -> None:
    stub.reply = Reply(completion('{"summary": []}'), delay=60)
    sandbox = make_sandbox(declarative_skill(tmp_path / "s"), llm=provider)
    asked = request()
    results = []
    runner = threading.Thread(target=lambda: results.append(sandbox.execute(asked)))
    runner.start()
    deadline = time.monotonic() + 10
    while not stub.received and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sandbox.cancel(asked.request_id)
    runner.join(timeout=10)

    assert results[0].status is ExecutionStatus.CANCELED


def test_without_a_provider_a_declarative_skill_fails_naming_the_missing_provider(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox]) -> None:
    sandbox = make_sandbox(declarative_skill(tmp_path / "s"))

    result = sandbox.execute(request())

    assert result.status is ExecutionStatus.FAILED
    assert result.error_kind is ErrorKind.WORKER_FAILURE
    assert "needs an LLM provider, but none is configured" in result.error
    assert "Sandbox(llm=...)" in result.error and "[llm]" in result.error


def test_a_provider_named_without_its_key_in_the_environment_is_refused_naming_the_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=f"{KEY_ENV} .*not set"):
        OpenAICompatibleProvider("http://127.0.0.1:9/v1", "m", api_key_env=KEY_ENV)
    # a local server without keys: no variable, no Authorization header
    OpenAICompatibleProvider("http://127.0.0.1:9/v1", "m", api_key_env=None).close()


# -- the key -------------------------------------------------------------------------------------


def test_the_api_key_never_appears_in_results_errors_or_logs(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer,
        provider: OpenAICompatibleProvider, caplog: pytest.LogCaptureFixture,
        skill_dir: Callable[..., Path]) -> None:
    caplog.set_level(logging.DEBUG)
    logger = RecordingLogger()
    leak = skill_dir("import os\n\ndef run(input, ctx):\n"
                     f"    return {{'key': os.environ.get({KEY_ENV!r})}}\n")
    sandbox = make_sandbox(declarative_skill(tmp_path / "s"), Skill.from_dir(leak),
                           llm=provider, logger=logger)
    # a provider that echoes the Authorization header in its error (as OpenAI's 401 echoes a
    # masked key) — the stub did receive the key (control), the caller must not
    stub.reply = Reply(status=401, echo_authorization=True)
    results = [sandbox.execute(request())]
    stub.reply = Reply(b"not json " + KEY.encode(), status=200)
    results.append(sandbox.execute(request()))
    stub.reply = Reply({"error": {"message": f"bad key {KEY}"}}, status=500)
    results.append(sandbox.execute(request()))
    # a skill running beside it cannot read it from its environment
    skill_id = Skill.from_dir(leak).id
    results.append(sandbox.execute(ExecutionRequest(skill_id=skill_id, input=b"{}")))

    assert os.environ[KEY_ENV] == KEY  # control: the supervisor has it
    assert all(received.headers["Authorization"] == f"Bearer {KEY}"
               for received in stub.received)  # control: it was sent
    assert results[0].status is ExecutionStatus.FAILED and "HTTP 401" in results[0].error
    assert "[redacted]" in results[0].error
    assert results[-1].json() == {"key": None}
    texts = [repr(result) for result in results] + [repr(record) for record in logger.records]
    texts += [caplog.text, repr(provider), str(vars(provider).get("name"))]
    for text in texts:
        assert KEY not in text


# -- control: policy, circuit breaker, execution log ----------------------------------------------


def test_policy_circuit_breaker_and_execution_log_apply_to_declarative_skills(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer,
        provider: OpenAICompatibleProvider) -> None:
    class DenyTenant:
        def check(self, request: ExecutionRequest, skill: Skill) -> str | None:
            return "tenant blocked" if request.tenant_id == "blocked" else None

    logger = RecordingLogger()
    breaker = InMemoryCircuitBreaker(failure_threshold=2)
    sandbox = make_sandbox(declarative_skill(tmp_path / "s"), llm=provider,
                           policy=DenyTenant(), circuit_breaker=breaker, logger=logger)
    stub.reply = Reply(completion('{"summary": ["ok"]}', total_tokens=17))

    denied = sandbox.execute(request(tenant_id="blocked"))
    assert denied.status is ExecutionStatus.REJECTED
    assert denied.error_kind is ErrorKind.POLICY_REJECTED
    assert stub.received == []  # rejected before any call

    assert sandbox.execute(request()).ok
    stub.reply = Reply(completion("no json here"))
    for _ in range(2):  # the skill's own fault: counts
        assert sandbox.execute(request()).error_kind is ErrorKind.SKILL_FAILED
    opened = sandbox.execute(request())
    assert opened.error_kind is ErrorKind.CIRCUIT_OPEN
    assert len(stub.received) == 3

    assert [(r.status, r.tokens) for r in logger.records] == [
        ("rejected", 0), ("success", 17), ("failed", 0), ("failed", 0), ("rejected", 0)]


def test_provider_failures_do_not_open_the_skills_circuit(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer,
        provider: OpenAICompatibleProvider) -> None:
    breaker = InMemoryCircuitBreaker(failure_threshold=2)
    sandbox = make_sandbox(declarative_skill(tmp_path / "s"), llm=provider,
                           circuit_breaker=breaker)
    stub.reply = Reply({"error": {"message": "overloaded"}}, status=503)
    for _ in range(3):
        assert sandbox.execute(request()).error_kind is ErrorKind.WORKER_FAILURE
    assert len(stub.received) == 3  # never refused by the breaker


# -- a Python callable as the provider ----------------------------------------------------------


def test_a_python_callable_is_a_provider(tmp_path: Path,
                                         make_sandbox: Callable[..., Sandbox]) -> None:
    prompts: list[str] = []

    def model(prompt: str) -> tuple[str, int]:
        prompts.append(prompt)
        return '{"summary": ["from a callable"]}', 7

    sandbox = make_sandbox(declarative_skill(tmp_path / "s"), llm=model)
    result = sandbox.execute(request(data={"text": "hi"}))

    assert result.ok, result.error
    assert result.json() == {"summary": ["from a callable"]}
    assert result.resource_usage.tokens_used == 7
    assert prompts == [SUMMARIZE.replace("{{.Input}}", '{"text": "hi"}')]


def test_a_callable_provider_gets_the_deadline_and_its_exception_fails_naming_it(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox]) -> None:
    seen: list[LLMCall] = []

    def model(prompt: str, call: LLMCall) -> str:
        seen.append(call)
        raise RuntimeError("model server is down")

    sandbox = make_sandbox(declarative_skill(tmp_path / "s", timeout=5), llm=model)
    result = sandbox.execute(request())

    assert result.status is ExecutionStatus.FAILED
    assert result.error_kind is ErrorKind.WORKER_FAILURE
    assert "raised RuntimeError: model server is down" in result.error
    assert 0 < seen[0].timeout <= 5


def test_an_async_callable_provider_that_ignores_its_deadline_still_times_out(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox]) -> None:
    import asyncio

    release = threading.Event()

    async def model(prompt: str) -> str:
        while not release.is_set():  # ignores the deadline it could have asked for
            await asyncio.sleep(0.02)
        return '{"summary": []}'

    sandbox = make_sandbox(declarative_skill(tmp_path / "s", timeout=0.3), llm=model)
    try:
        result = sandbox.execute(request())
    finally:
        release.set()
    assert result.status is ExecutionStatus.TIMEOUT


def test_any_object_with_generate_is_a_provider(tmp_path: Path,
                                                 make_sandbox: Callable[..., Sandbox]) -> None:
    class Local:  # no `name`: errors name its type
        def generate(self, prompt: str, *, max_tokens: int | None = None,
                     deadline: float) -> tuple[str, int]:
            if "fail" in prompt:
                raise ConnectionError("socket closed")
            return '{"summary": ["local"]}', 3

    sandbox = make_sandbox(declarative_skill(tmp_path / "s"), llm=Local())
    ok = sandbox.execute(request())
    failed = sandbox.execute(request(data={"text": "fail"}))

    assert ok.json() == {"summary": ["local"]} and ok.resource_usage.tokens_used == 3
    assert failed.error_kind is ErrorKind.WORKER_FAILURE
    assert "LLM provider Local raised ConnectionError: socket closed" in failed.error


# -- plans' llm steps ----------------------------------------------------------------------------


def llm_plan(prompt: str) -> ExecutionPlan:
    return ExecutionPlan.from_dict({"assistant_id": "writer", "steps": [
        {"name": "who", "type": "tool", "arguments": {}},
        {"name": "respond", "type": "llm", "arguments": {"prompt": prompt}},
    ]})


def test_an_llm_plan_step_sends_its_rendered_prompt_and_outputs_the_text(
        make_sandbox: Callable[..., Sandbox], stub: StubLLMServer,
        provider: OpenAICompatibleProvider) -> None:
    logger = RecordingLogger()
    sandbox = make_sandbox(llm=provider, logger=logger)
    sandbox.register_tool("who", lambda arguments: {"name": "Ada"})
    stub.reply = Reply(completion("Hello, Ada!", total_tokens=11))

    results = sandbox.execute_plan(llm_plan("Greet {{who.name}} warmly."),
                                   ExecutionContext(timeout=10))

    assert [(r.step_name, r.type, r.status) for r in results] == [
        ("who", "tool", "success"), ("respond", "llm", "success")]
    assert results[1].output == "Hello, Ada!"
    assert results[1].execution is not None
    assert results[1].execution.resource_usage.tokens_used == 11
    assert stub.received[0].body["messages"][0]["content"] == "Greet Ada warmly."
    [record] = [r for r in logger.records if r.step_type == "llm"]
    assert (record.step_name, record.status, record.tokens) == ("respond", "success", 11)


def test_an_llm_plan_step_runs_under_asyncio_too(
        make_sandbox: Callable[..., Sandbox], stub: StubLLMServer,
        provider: OpenAICompatibleProvider) -> None:
    import asyncio

    sandbox = make_sandbox(llm=provider)
    sandbox.register_tool("who", lambda arguments: {"name": "Grace"})
    stub.reply = Reply(completion("Hi Grace", total_tokens=3))

    results = asyncio.run(sandbox.aexecute_plan(llm_plan("Greet {{who.name}}")))

    assert results[1].output == "Hi Grace"


def test_a_failing_llm_step_stops_the_plan_with_the_providers_error(
        make_sandbox: Callable[..., Sandbox], stub: StubLLMServer,
        provider: OpenAICompatibleProvider) -> None:
    sandbox = make_sandbox(llm=provider)
    sandbox.register_tool("who", lambda arguments: {"name": "Ada"})
    stub.reply = Reply({"error": {"message": "upstream exploded"}}, status=500)

    with pytest.raises(PlanFailed) as failed:
        sandbox.execute_plan(llm_plan("Greet {{who.name}}"))

    step = failed.value.step_result
    assert (step.step_name, step.status) == ("respond", "failed")
    assert "HTTP 500: upstream exploded" in step.error


def test_an_llm_step_past_the_plans_deadline_times_out(
        make_sandbox: Callable[..., Sandbox], stub: StubLLMServer,
        provider: OpenAICompatibleProvider) -> None:
    sandbox = make_sandbox(llm=provider)
    sandbox.register_tool("who", lambda arguments: {"name": "Ada"})
    stub.reply = Reply(completion("late"), delay=60)

    with pytest.raises(PlanFailed) as failed:
        sandbox.execute_plan(llm_plan("Greet {{who.name}}"), ExecutionContext(timeout=0.5))

    assert failed.value.step_result.status == "timeout"


def test_an_llm_step_without_a_prompt_fails_naming_the_argument(
        make_sandbox: Callable[..., Sandbox], provider: OpenAICompatibleProvider) -> None:
    sandbox = make_sandbox(llm=provider)
    plan = ExecutionPlan.from_dict({"assistant_id": "a", "steps": [
        {"name": "respond", "type": "llm", "arguments": {"text": "no prompt"}}]})

    with pytest.raises(PlanFailed) as failed:
        sandbox.execute_plan(plan)

    assert "'prompt' argument" in failed.value.step_result.error


def test_a_plan_with_an_llm_step_is_invalid_without_a_provider(
        make_sandbox: Callable[..., Sandbox]) -> None:
    sandbox = make_sandbox()
    sandbox.register_tool("who", lambda arguments: {"name": "Ada"})
    plan = llm_plan("Greet {{who.name}}")

    with pytest.raises(InvalidPlan, match=r"steps\[1\] 'respond': an llm step needs an LLM "
                                          "provider"):
        sandbox.execute_plan(plan)
    plan.validate()  # without a target, the plan itself is well formed


# -- daemon configuration -----------------------------------------------------------------------


def test_daemon_config_llm_section_builds_the_provider(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.daemon.config import ConfigError, load_config

    config_file = tmp_path / "sandbox.toml"
    config_file.write_text('[llm]\nbase_url = "http://127.0.0.1:8000/v1"\nmodel = "qwen"\n'
                           f'api_key_env = "{KEY_ENV}"\nmax_tokens = 256\n')
    monkeypatch.setenv(KEY_ENV, KEY)
    config = load_config(config_file, env={})
    provider = config.llm.to_provider()
    assert isinstance(provider, OpenAICompatibleProvider)
    assert (provider.url, provider.model, provider.max_tokens) == (
        "http://127.0.0.1:8000/v1/chat/completions", "qwen", 256)
    provider.close()
    assert load_config(None, env={}).llm.to_provider() is None
    # the environment sets it too, and half a section is an error naming the section
    env = {"SKILL_SANDBOX_LLM_BASE_URL": "http://127.0.0.1:8000/v1"}
    with pytest.raises(ConfigError, match="llm"):
        load_config(None, env=env)


@pytest.mark.timeout(60)
def test_the_daemon_runs_declarative_skills_through_its_llm_section(
        tmp_path: Path, start_daemon: Callable[..., Any], stub: StubLLMServer) -> None:
    declarative_skill(tmp_path / "skills" / "summarize")
    stub.reply = Reply(completion('{"summary": ["via the daemon"]}', total_tokens=5))
    config = (f'[llm]\nbase_url = "{stub.base_url}"\nmodel = "stub-model"\n'
              f'api_key_env = "{KEY_ENV}"\n')
    item = start_daemon([tmp_path / "skills"], config=config, env={KEY_ENV: KEY}).start()
    with item.client() as client:
        result = client.execute(request())
    assert item.stop() == 0

    assert result.ok, result.error
    assert result.json() == {"summary": ["via the daemon"]}
    assert result.resource_usage.tokens_used == 5
    assert stub.received[0].headers["Authorization"] == f"Bearer {KEY}"
    assert KEY not in item.log_text()


@pytest.mark.timeout(90)
def test_sighup_replaces_the_llm_provider_and_keeps_it_when_the_new_section_is_broken(
        tmp_path: Path, start_daemon: Callable[..., Any], stub: StubLLMServer) -> None:
    import signal

    from daemon_util import wait_for

    declarative_skill(tmp_path / "skills" / "summarize")
    other = next(second := running_stub())

    def section(server: StubLLMServer, model: str, key_env: str = KEY_ENV) -> str:
        return f'[llm]\nbase_url = "{server.base_url}"\nmodel = "{model}"\n' \
               f'api_key_env = "{key_env}"\n'

    def reload(config: str, count: int) -> dict[str, Any]:
        (item.dir / "config.toml").write_text(config)
        item.signal(signal.SIGHUP)
        wait_for(lambda: len(item.find_events("reload")) == count, what=f"reload {count}")
        event: dict[str, Any] = item.find_events("reload")[-1]
        return event

    try:
        stub.reply = Reply(completion('{"summary": ["first"]}'))
        other.reply = Reply(completion('{"summary": ["second"]}'))
        item = start_daemon([tmp_path / "skills"], config=section(stub, "model-a"),
                            env={KEY_ENV: KEY}).start()
        with item.client() as client:
            assert client.execute(request()).json() == {"summary": ["first"]}
            reload(section(other, "model-b"), 2)
            assert client.execute(request()).json() == {"summary": ["second"]}
            broken = reload(section(stub, "model-c", key_env="NOT_SET_ANYWHERE"), 3)
            assert "NOT_SET_ANYWHERE" in " ".join(broken["errors"])
            assert "keeping the previous provider" in " ".join(broken["errors"])
            assert client.execute(request()).json() == {"summary": ["second"]}
            reload("", 4)
            gone = client.execute(request())
        assert item.stop() == 0
    finally:
        second.close()
    assert [received.body["model"] for received in stub.received] == ["model-a"]
    assert [received.body["model"] for received in other.received] == ["model-b", "model-b"]
    assert gone.status is ExecutionStatus.FAILED and "needs an LLM provider" in gone.error


@pytest.mark.timeout(60)
def test_cli_run_takes_the_provider_from_the_config_and_fails_clearly_without_one(
        tmp_path: Path, stub: StubLLMServer) -> None:
    from click.testing import CliRunner

    from sandbox.cli import main

    declarative_skill(tmp_path / "summarize")
    stub.reply = Reply(completion('{"summary": ["from the cli"]}', total_tokens=4))
    config = tmp_path / "sandbox.toml"
    config.write_text(f'[llm]\nbase_url = "{stub.base_url}"\nmodel = "cli-model"\n'
                      f'api_key_env = "{KEY_ENV}"\n')
    args = ["run", str(tmp_path / "summarize"), "--input", '{"text": "t"}', "--json"]
    env = {KEY_ENV: KEY, "SKILL_SANDBOX_LLM_BASE_URL": None, "SKILL_SANDBOX_LLM_MODEL": None}
    ran = CliRunner().invoke(main, [*args, "--config", str(config)], env=env)
    without = CliRunner().invoke(main, args, env=env)
    unset = CliRunner().invoke(main, [*args, "--config", str(config)], env={KEY_ENV: ""})

    assert ran.exit_code == 0, ran.output
    assert json.loads(ran.output)["output"] == {"summary": ["from the cli"]}
    assert json.loads(ran.output)["resource_usage"]["tokens_used"] == 4
    assert without.exit_code == 1 and "needs an LLM provider" in without.output
    assert unset.exit_code == 2 and f"variable {KEY_ENV}" in unset.output
    assert [received.body["model"] for received in stub.received] == ["cli-model"]


@pytest.mark.timeout(60)
def test_cli_run_gives_the_provider_to_a_python_skill_granted_llm_generate_only(
        tmp_path: Path, stub: StubLLMServer) -> None:
    from click.testing import CliRunner

    from sandbox.cli import main

    stub.reply = Reply(completion("from the provider", total_tokens=3))
    for name, host in (("granted", '["llm:generate"]'), ("plain", "[]")):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "main.py").write_text(
            "def run(input, ctx):\n"
            "    try:\n"
            "        return ctx.llm_generate('hi')\n"
            "    except ctx.HostCallError as exc:\n"
            "        return str(exc)\n")
        (directory / "skill.toml").write_text(
            f'id = "test/{name}"\nentrypoint = "main:run"\n[permissions]\nhost = {host}\n')
    config = tmp_path / "sandbox.toml"
    config.write_text(f'[llm]\nbase_url = "{stub.base_url}"\nmodel = "cli-model"\n'
                      f'api_key_env = "{KEY_ENV}"\n')
    env = {KEY_ENV: KEY, "SKILL_SANDBOX_LLM_BASE_URL": None, "SKILL_SANDBOX_LLM_MODEL": None}
    runs = {name: CliRunner().invoke(main, ["run", str(tmp_path / name), "--json",
                                            "--config", str(config)], env=env)
            for name in ("granted", "plain")}

    assert runs["granted"].exit_code == 0, runs["granted"].output
    granted = json.loads(runs["granted"].output)
    assert granted["output"] == "from the provider"
    assert granted["resource_usage"]["tokens_used"] == 3
    plain = json.loads(runs["plain"].output)
    assert "does not grant permission 'llm:generate'" in plain["output"]
    assert len(stub.received) == 1  # only the granted skill's call reached the provider


@pytest.mark.timeout(60)
def test_the_daemon_refuses_to_start_when_the_named_key_variable_is_unset(
        tmp_path: Path, start_daemon: Callable[..., Any]) -> None:
    config = '[llm]\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "m"\n' \
             f'api_key_env = "{KEY_ENV}"\n'
    item = start_daemon([], config=config, env={KEY_ENV: ""})
    item.spawn()

    assert item.wait() == 2
    assert f"field 'llm': LLM provider 'm' at http://127.0.0.1:9/v1: the environment " \
           f"variable {KEY_ENV} (api_key_env) is not set or empty" in item.log_text()
