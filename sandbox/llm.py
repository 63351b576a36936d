"""LLM providers: how declarative skills, plans' `llm` steps (and WASM `llm_generate`) reach a
model the operator configured.

The call happens in the supervisor, never in an execution child: the API key lives in this
process only (read once from the environment variable the operator names) and never enters a
skill's process, a result, an error text or a log line.

A provider is any object with `generate(prompt, *, max_tokens, deadline) -> Generation`
(`deadline` is a `time.monotonic()` instant; `Generation` is `(text, tokens)`), raising
`LLMError` for a failure it can name and `LLMTimeout` when the deadline passed. Two come with
the sandbox: `OpenAICompatibleProvider` (an OpenAI-compatible `POST {base_url}/chat/completions`
over httpx: OpenAI, vLLM, llama.cpp, Ollama, LiteLLM, ...) and `CallableProvider` (a trusted
Python callable, registered like a tool). `call` runs any provider under a deadline and a
cancel check, so a provider that ignores its deadline still cannot hold the caller past it.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

from sandbox import jsonbounds
from sandbox.skilltext import printable
from worker.protocol import MAX_TOKENS

if TYPE_CHECKING:  # httpx is imported when an OpenAICompatibleProvider is made
    import httpx

#: Largest HTTP response body read from a provider (the reply is JSON around the model's text).
DEFAULT_MAX_RESPONSE_BYTES = 4 << 20
#: How often a caller waiting for a provider checks whether it was cancelled.
_POLL = 0.05
#: Longest provider error text quoted in a result.
_MAX_MESSAGE = 500


class Generation(NamedTuple):
    """What a provider answered: the model's text and the tokens it cost (`usage.total_tokens`
    for OpenAI-compatible providers; 0 when the provider does not say)."""

    text: str
    tokens: int = 0


class LLMError(Exception):
    """A provider call that failed for a reason it names (HTTP status and the provider's own
    message, an unreachable endpoint, a reply that is not the chat-completions shape)."""


class LLMTimeout(LLMError):
    """The deadline passed before the provider answered."""


class LLMCanceled(LLMError):
    """The caller cancelled while the provider was answering."""


@runtime_checkable
class LLMProvider(Protocol):
    """What the sandbox asks of a provider. `name` appears in error texts (never a secret)."""

    name: str

    def generate(self, prompt: str, *, max_tokens: int | None = None,
                 deadline: float) -> Generation: ...


@dataclass(frozen=True)
class LLMCall:
    """Given to a `CallableProvider` function that takes a second parameter."""

    max_tokens: int | None
    #: `time.monotonic()` instant by which the answer is needed.
    deadline: float

    @property
    def timeout(self) -> float:
        """Seconds left until `deadline` (never negative)."""
        return max(0.0, self.deadline - time.monotonic())


class OpenAICompatibleProvider:
    """An OpenAI-compatible chat-completions endpoint: `POST {base_url}/chat/completions` with
    one user message; the reply's `choices[0].message.content` is the text and
    `usage.total_tokens` the cost.

    The key is read once, here, from the environment variable `api_key_env` (None or "": send
    no `Authorization`, e.g. a local llama.cpp or Ollama); an unset or empty variable is an
    error naming the variable. Every wait (connect, send, each read) is bounded by the call's
    deadline, the response body by `max_response_bytes`. Thread-safe (one httpx connection pool);
    `close()` releases it.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY",
                 max_tokens: int | None = None, temperature: float | None = None,
                 max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
                 transport: httpx.BaseTransport | None = None) -> None:
        import httpx

        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"LLM provider base_url {base_url!r} is not an http(s) URL")
        if not model:
            raise ValueError("LLM provider: model is empty")
        if max_response_bytes < 1:
            raise ValueError(f"max_response_bytes must be positive, got {max_response_bytes}")
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.api_key_env = api_key_env or None
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.max_response_bytes = max_response_bytes
        self.name = f"{model!r} at {self.base_url}"
        self.__key = ""
        if self.api_key_env is not None:
            self.__key = os.environ.get(self.api_key_env, "")
            if not self.__key:
                raise ValueError(f"LLM provider {self.name}: the environment variable "
                                 f"{self.api_key_env} (api_key_env) is not set or empty")
        self._client = httpx.Client(transport=transport, follow_redirects=False)

    def __repr__(self) -> str:  # the key is never part of it
        return (f"OpenAICompatibleProvider(base_url={self.base_url!r}, model={self.model!r}, "
                f"api_key_env={self.api_key_env!r})")

    def close(self) -> None:
        self._client.close()

    def _redact(self, text: str) -> str:
        """`text` without the key (a provider may echo what it was sent in its error)."""
        return text.replace(self.__key, "[redacted]") if self.__key else text

    def generate(self, prompt: str, *, max_tokens: int | None = None,
                 deadline: float) -> Generation:
        body: dict[str, Any] = {"model": self.model, "stream": False,
                                "messages": [{"role": "user", "content": prompt}]}
        if (max_tokens or self.max_tokens) is not None:
            body["max_tokens"] = max_tokens or self.max_tokens
        if self.temperature is not None:
            body["temperature"] = self.temperature
        import httpx

        headers = {"Accept": "application/json"}
        if self.__key:
            headers["Authorization"] = f"Bearer {self.__key}"
        try:
            status, raw = self._post(body, headers, deadline)
        except LLMError as exc:
            raise type(exc)(self._redact(str(exc))) from None
        except httpx.TimeoutException:
            raise LLMTimeout(f"LLM provider {self.name} did not answer in time") from None
        except httpx.HTTPError as exc:
            detail = self._redact(printable(str(exc))[:_MAX_MESSAGE])
            raise LLMError(f"LLM provider {self.name}: {type(exc).__name__}: {detail}") from None
        return self._generation(status, raw)

    def _post(self, body: dict[str, Any], headers: dict[str, str],
              deadline: float) -> tuple[int, bytes]:
        import httpx

        left = deadline - time.monotonic()
        if left <= 0:
            raise LLMTimeout(f"LLM provider {self.name}: no time left for the call")
        with self._client.stream("POST", self.url, json=body, headers=headers,
                                 timeout=httpx.Timeout(left)) as response:
            chunks: list[bytes] = []
            size = 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > self.max_response_bytes:
                    raise LLMError(f"LLM provider {self.name}: response larger than "
                                   f"{self.max_response_bytes} bytes (HTTP "
                                   f"{response.status_code})")
                chunks.append(chunk)
                if time.monotonic() > deadline:  # a server dripping bytes under the read timeout
                    raise LLMTimeout(f"LLM provider {self.name} did not answer in time")
            return response.status_code, b"".join(chunks)

    def _generation(self, status: int, raw: bytes) -> Generation:
        data: Any = None
        data, problem = jsonbounds.decode(raw) if raw else (None, "empty")
        if status != 200:
            message = _provider_message(data) if not problem else \
                printable(raw.decode("utf-8", "replace")).strip()
            detail = f": {self._redact(message[:_MAX_MESSAGE])}" if message else ""
            raise LLMError(f"LLM provider {self.name}: HTTP {status}{detail}")
        if problem:
            raise LLMError(f"LLM provider {self.name}: the response body is {problem[:200]}")
        try:
            text = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            text = None
        if not isinstance(text, str):
            raise LLMError(f"LLM provider {self.name}: the response has no "
                           "choices[0].message.content text")
        return Generation(text, _total_tokens(data))


def _provider_message(data: Any) -> str:
    """The provider's own error text: OpenAI's `{"error": {"message": ...}}` and the usual
    variants (`{"error": "..."}`, `{"message": ...}`, `{"detail": ...}`)."""
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            error = error.get("message")
        for value in (error, data.get("message"), data.get("detail")):
            if isinstance(value, str) and value:
                return printable(value).strip()
    return ""


def _total_tokens(data: Any) -> int:
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return 0
    total = usage.get("total_tokens")
    if not isinstance(total, int) or isinstance(total, bool):
        parts = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
        total = sum(p for p in parts if isinstance(p, int) and not isinstance(p, bool))
    return min(max(0, total), MAX_TOKENS)


class CallableProvider:
    """A trusted Python function as the provider: `fn(prompt)` or `fn(prompt, call)` (`call`
    an `LLMCall` with `max_tokens`, `deadline`, `timeout`), sync or async, returning the text,
    `(text, tokens)` or a `Generation`. It runs in the supervisor; an exception it raises fails
    the execution with its type and message."""

    def __init__(self, fn: Callable[..., Any], name: str | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"an LLM provider must be callable or have generate(), got {fn!r}")
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", None) or repr(fn)
        try:
            parameters = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            parameters = []
        positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY,
                                                           p.POSITIONAL_OR_KEYWORD)]
        self.with_call = len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL
                                                     for p in parameters)

    def generate(self, prompt: str, *, max_tokens: int | None = None,
                 deadline: float) -> Generation:
        args: tuple[Any, ...] = (prompt, LLMCall(max_tokens, deadline)) if self.with_call \
            else (prompt,)
        try:
            answer = self.fn(*args)
            if inspect.isawaitable(answer):
                answer = asyncio.run(_awaited(answer))
        except LLMError:
            raise
        except Exception as exc:  # noqa: BLE001 - the function's failure is the call's
            raise LLMError(f"LLM provider {self.name} raised {type(exc).__name__}: "
                           f"{printable(str(exc))[:_MAX_MESSAGE]}") from None
        return _as_generation(answer, self.name)


async def _awaited(answer: Any) -> Any:
    return await answer


def _as_generation(answer: Any, name: str) -> Generation:
    if isinstance(answer, Generation):
        text, tokens = answer
    elif isinstance(answer, str):
        text, tokens = answer, 0
    elif (isinstance(answer, tuple) and len(answer) == 2 and isinstance(answer[0], str)
          and isinstance(answer[1], int) and not isinstance(answer[1], bool)):
        text, tokens = answer
    else:
        raise LLMError(f"LLM provider {name} returned {type(answer).__name__}, not the text, "
                       "(text, tokens) or a Generation")
    if not isinstance(text, str) or not isinstance(tokens, int):
        raise LLMError(f"LLM provider {name} returned a Generation that is not (str, int)")
    return Generation(text, min(max(0, tokens), MAX_TOKENS))


class _Named:
    """A provider object without a `name` of its own: named after its type for errors."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider
        self.name = type(provider).__name__

    def generate(self, prompt: str, *, max_tokens: int | None = None,
                 deadline: float) -> Generation:
        return self.provider.generate(prompt, max_tokens=max_tokens,  # type: ignore[no-any-return]
                                      deadline=deadline)


def as_provider(value: Any) -> LLMProvider | None:
    """`Sandbox(llm=...)`: a provider (anything with `generate`), a callable, or None."""
    if value is None:
        return None
    if callable(getattr(value, "generate", None)):
        return value if isinstance(getattr(value, "name", None), str) else _Named(value)
    return CallableProvider(value)


def call(provider: LLMProvider, prompt: str, *, deadline: float, max_tokens: int | None = None,
         canceled: Callable[[], bool] = lambda: False) -> Generation:
    """`provider.generate(...)` bounded by `deadline` (monotonic) and `canceled`, whatever the
    provider does: it runs in a thread of its own and this returns (raising `LLMTimeout` or
    `LLMCanceled`) when the deadline passes or the caller cancels, even if the provider does not
    honour its deadline (its thread then finishes on its own; its answer is dropped).

    This is the one entry point for every caller in the supervisor: declarative skills, plan
    `llm` steps, and a WASM skill's `llm_generate` host call.
    """
    outcome: list[Generation | BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            outcome.append(provider.generate(prompt, max_tokens=max_tokens, deadline=deadline))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
            outcome.append(exc)
        finally:
            done.set()

    if deadline - time.monotonic() <= 0:
        raise LLMTimeout(f"LLM provider {provider.name}: no time left for the call")
    threading.Thread(target=run, name="sandbox-llm", daemon=True).start()
    while not done.is_set():
        if canceled():
            raise LLMCanceled(f"LLM provider {provider.name}: the call was canceled")
        left = deadline - time.monotonic()
        if left <= 0:
            raise LLMTimeout(f"LLM provider {provider.name} did not answer in time")
        done.wait(min(left, _POLL))
    answer = outcome[0]
    if isinstance(answer, LLMError):
        raise answer
    if isinstance(answer, Exception):  # a provider's own bug: named, not propagated raw
        raise LLMError(f"LLM provider {provider.name} raised {type(answer).__name__}: "
                       f"{printable(str(answer))[:_MAX_MESSAGE]}")
    if isinstance(answer, BaseException):
        raise answer
    return _as_generation(answer, provider.name)
