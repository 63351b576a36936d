"""A hostile (or broken) LLM provider: usage figures no provider could mean. The supervisor
takes `usage` from the provider's reply as a declarative skill's `tokens_used`; whatever it
says, the figure stays within what every consumer (the result, the execution log, metrics)
can hold, and the execution is answered and logged."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox import Sandbox
from sandbox.jsonbounds import decode
from sandbox.llm import OpenAICompatibleProvider
from tests.llm_stub import Reply, StubLLMServer, completion, running_stub
from tests.test_llm import KEY, KEY_ENV, RecordingLogger, declarative_skill, request
from worker.protocol import MAX_TOKENS

_BIG = 2**62  # an int64, so the reply decodes; far past what a float64 store holds exactly


def _reply(usage: Any) -> dict[str, Any]:
    body = completion('{"summary": ["ok"]}')
    body["usage"] = usage
    return body


#: usage -> the tokens the supervisor may report for it
USAGES: dict[str, tuple[Any, int]] = {
    "total past 2**53": ({"total_tokens": _BIG}, MAX_TOKENS),
    "parts summing past int64": ({"prompt_tokens": _BIG, "completion_tokens": _BIG},
                                 MAX_TOKENS),
    "negative total": ({"total_tokens": -5}, 0),
    "negative parts": ({"prompt_tokens": -_BIG, "completion_tokens": 3}, 0),
    "float total": ({"total_tokens": 1e308, "prompt_tokens": 2, "completion_tokens": 3}, 5),
    "boolean total": ({"total_tokens": True}, 0),
    "string total": ({"total_tokens": "99999999999999999999999"}, 0),
    "usage not a mapping": ([1, 2, 3], 0),
}


@pytest.fixture
def stub() -> Iterator[StubLLMServer]:
    yield from running_stub()


@pytest.mark.parametrize("case", sorted(USAGES))
def test_absurd_provider_usage_is_clamped_and_the_execution_logged(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer,
        monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    usage, expected = USAGES[case]
    body = _reply(usage)
    # Control: the reply decodes, with the absurd figure as sent (nothing upstream tames it).
    decoded, problem = decode(json.dumps(body).encode())
    assert not problem and decoded["usage"] == usage
    stub.reply = Reply(body)
    monkeypatch.setenv(KEY_ENV, KEY)
    provider = OpenAICompatibleProvider(stub.base_url, "stub-model", api_key_env=KEY_ENV)
    logger = RecordingLogger()
    try:
        skill = declarative_skill(tmp_path / "summarize")
        sandbox = make_sandbox(skill, llm=provider, logger=logger)
        result = sandbox.execute(request())
    finally:
        provider.close()
    assert result.ok, result
    assert result.resource_usage.tokens_used == expected, result.resource_usage
    [record] = logger.records
    assert record.tokens == expected and record.status == "success", record
