"""Runs a Python skill's entrypoint inside the execution child and writes its one result frame.

The input arrives as JSON bytes on the request pipe; the answer leaves as a single
length-prefixed `ChildResult` frame on the result pipe. Whatever the skill does — raise, return
garbage, hit a limit — ends here as a frame or as a process exit the supervisor interprets.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import os
import sys
import time
import traceback
import types
import typing
from types import CodeType
from typing import Any

import msgspec

from worker.hostcall import HostCaller, HostCallError
from worker.protocol import (
    EXIT_FRAME_FAILED,
    HOST_CALL_PERMISSIONS,
    MAX_TOKENS,
    ChildResult,
    ExecutionInput,
    ForkCommand,
    FrameError,
    HostCall,
    SkillCode,
    decode_frame,
    encode_frame,
    read_frame,
    write_all,
)


class SkillContext:
    """The second argument of `run(input, ctx)`: who is asking, where to write, until when."""

    #: What `llm_generate` and `http_fetch` raise (`except ctx.HostCallError:`).
    HostCallError = HostCallError

    __slots__ = ("_host", "_permissions", "_tokens", "deadline", "request_id", "skill_id",
                 "tenant_id", "user_id", "workdir")

    def __init__(self, command: ForkCommand, request: ExecutionInput,
                 host: list[str] | None = None) -> None:
        self.request_id = request.request_id
        self.skill_id = request.skill_id
        self.tenant_id = request.tenant_id
        self.user_id = request.user_id
        self.workdir = command.workdir
        self.deadline = request.deadline  # a time.time() instant
        self._tokens = 0
        self._permissions = host or []
        self._host: HostCaller | None = None

    def time_left(self) -> float:
        """Seconds until the supervisor kills this execution."""
        return max(0.0, self.deadline - time.time())

    def report_tokens(self, count: int) -> None:
        """Add `count` to the tokens this execution used (lands in `resource_usage.tokens_used`).

        `count` is at most `MAX_TOKENS` (2**53 - 1); the total saturates there.
        """
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_TOKENS:
            raise ValueError(f"report_tokens needs a non-negative int up to {MAX_TOKENS} "
                             f"(2**53 - 1), got {count!r}")
        self._tokens = min(self._tokens + count, MAX_TOKENS)

    @property
    def tokens_used(self) -> int:
        return self._tokens

    def llm_generate(self, prompt: str) -> str:
        """The text the supervisor's LLM provider generates for `prompt` (permission
        `llm:generate` in the manifest's `permissions.host`). The provider and its key stay
        in the supervisor; its tokens are counted into this execution's `tokens_used` there.
        Raises `HostCallError` (a RuntimeError) when refused or failed."""
        reply = self._caller().ask(HostCall(kind="llm_generate", prompt=str(prompt)))
        return reply.data.decode("utf-8", "replace")

    def http_fetch(self, url: str, method: str = "GET", body: bytes | str = b"") -> tuple[int,
                                                                                       bytes]:
        """(status, body) of an HTTP request made by the supervisor's `http_fetch` tool
        (permission `http:fetch`); the body is cut at 1 MiB. Raises `HostCallError`."""
        data = body.encode() if isinstance(body, str) else bytes(body)
        reply = self._caller().ask(HostCall(kind="http_fetch", url=str(url),
                                            method=str(method), body=data))
        return reply.status, reply.data

    def _caller(self) -> HostCaller:
        if self._host is None:
            self._host = HostCaller(self._permissions)
        return self._host


class _InputMismatch(Exception):
    """The JSON input does not fit the type the entrypoint's parameter is annotated with."""


#: Largest request frame read: the supervisor bounds the input far below this.
_MAX_REQUEST_FRAME = 1 << 31


def read_request(fd: int, keep_open: bool = False) -> ExecutionInput:
    """The one `ExecutionInput` frame the supervisor wrote on the request pipe. Exactly the
    frame is read: a skill granted host calls (`keep_open`) gets its replies on this pipe
    later, so the supervisor keeps it open and reading to EOF would block; others close it."""
    try:
        frame = read_frame(fd, _MAX_REQUEST_FRAME)
        if not keep_open:
            os.close(fd)
        return decode_frame(frame, _INPUT_DECODER)  # type: ignore[no-any-return]
    except FrameError as exc:
        raise RuntimeError(f"the request pipe held no valid request: {exc}") from None


_INPUT_DECODER = msgspec.msgpack.Decoder(ExecutionInput)


def load_entrypoint(code: SkillCode, precompiled: CodeType | None) -> Any:
    module_name, _, function_name = code.entrypoint.partition(":")
    sys.path.insert(0, code.skill_dir)
    if precompiled is not None:
        module = types.ModuleType(module_name)
        module.__file__ = precompiled.co_filename
        sys.modules[module_name] = module
        exec(precompiled, module.__dict__)
    else:
        import importlib

        module = importlib.import_module(module_name)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise AttributeError(f"entrypoint {code.entrypoint!r}: {function_name!r} is not a "
                             f"callable in module {module_name!r}")
    return function


def _first_parameter_annotation(function: Any) -> Any:
    """The first parameter's annotation, resolved; None when it has none.

    A plain function answers from its code object and `__annotations__`: `inspect` and
    `typing.get_type_hints` cost ~0.2 ms of copy-on-write faults in a fresh fork, so they are
    the fallback for other callables and for string annotations only.
    """
    code = getattr(function, "__code__", None)
    if isinstance(function, types.FunctionType) and code is not None:
        if not code.co_argcount:
            return None
        raw = function.__annotations__.get(code.co_varnames[0])
        if raw is None or not isinstance(raw, str):
            return raw
    try:
        hints = typing.get_type_hints(function)
        parameters = list(inspect.signature(function).parameters)
    except Exception:  # noqa: BLE001 - unresolvable annotations: pass the JSON as it is
        return None
    return hints.get(parameters[0]) if parameters else None


def _convert_input(function: Any, data: Any) -> Any:
    """Convert the decoded JSON to the first parameter's annotated type, if it has one."""
    annotation = _first_parameter_annotation(function)
    if annotation is None or annotation is Any or annotation is object:
        return data
    validate = getattr(annotation, "model_validate", None)  # a pydantic model, duck-typed
    try:
        if validate is not None:
            return validate(data)
        return msgspec.convert(data, type=annotation)
    except Exception as exc:  # noqa: BLE001 - any conversion error is the skill's input error
        raise _InputMismatch(str(exc)) from None


_CO_VARARGS = inspect.CO_VARARGS


def _wants_context(function: Any) -> bool:
    """`run(input, ctx)` or `run(*args)` gets the context; `run(input)` does not."""
    code = getattr(function, "__code__", None)
    if isinstance(function, types.FunctionType) and code is not None:
        return code.co_argcount >= 2 or bool(code.co_flags & _CO_VARARGS)
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in positional)


def _encode_hook(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)  # pydantic models
    if callable(dump):
        return dump(mode="json")
    raise TypeError(f"return value of type {type(value).__name__} is not JSON-serialisable")


def call_skill(code: SkillCode, command: ForkCommand, precompiled: CodeType | None,
               request: ExecutionInput) -> ChildResult:
    if code.kind == "wasm":
        from worker import wasm  # imported by the zygote already: no import cost here

        return wasm.call(code, command, request)
    ctx = SkillContext(command, request, code.host)
    try:
        function = load_entrypoint(code, precompiled)
        try:
            data = msgspec.json.decode(request.input)
        except msgspec.DecodeError as exc:
            raise _InputMismatch(f"input is not JSON: {exc}") from None
        argument = _convert_input(function, data)
        value = function(argument, ctx) if _wants_context(function) else function(argument)
        if inspect.isawaitable(value):
            import asyncio

            value = asyncio.run(_await(value))
        try:
            output = msgspec.json.encode(value, enc_hook=_encode_hook)
        except (TypeError, msgspec.EncodeError) as exc:
            return ChildResult(ok=False, error=f"invalid output: {exc}",
                               tokens_used=ctx.tokens_used)
        if len(output) > command.limits.max_output_bytes:
            return ChildResult(ok=False, limit="output", tokens_used=ctx.tokens_used,
                               error=f"output is {len(output)} bytes, limit is "
                                     f"{command.limits.max_output_bytes}")
        return ChildResult(ok=True, output=output, tokens_used=ctx.tokens_used)
    except _InputMismatch as exc:
        return ChildResult(ok=False, error=f"invalid input: {exc}", tokens_used=ctx.tokens_used)
    except MemoryError:
        return ChildResult(ok=False, limit="memory", error="MemoryError",
                           tokens_used=ctx.tokens_used)
    except BaseException as exc:  # noqa: BLE001 - the skill's failure is its result
        if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
            return ChildResult(ok=False, limit="file size", error=f"OSError: {exc}",
                               tokens_used=ctx.tokens_used)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # the workdir's tmpfs is full: its size is the execution's disk quota
            return ChildResult(ok=False, limit="disk", error=f"OSError: {exc}",
                               tokens_used=ctx.tokens_used)
        if isinstance(exc, RuntimeError) and str(exc) == "can't start new thread":
            # pthread_create failed: the task cap or the data limit (thread stacks count)
            return ChildResult(ok=False, limit="threads", error=f"RuntimeError: {exc}",
                               tokens_used=ctx.tokens_used)
        traceback.print_exc()
        message = str(exc)
        error = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
        return ChildResult(ok=False, error=error, tokens_used=ctx.tokens_used)


async def _await(awaitable: Any) -> Any:
    return await awaitable


def run_and_exit(code: SkillCode, command: ForkCommand, precompiled: CodeType | None,
                 result_fd: int, request_fd: int) -> None:
    """Read the input, run the skill, write one frame, exit. Never returns."""
    status = 0
    try:
        sys.dont_write_bytecode = True
        host_calls = not set(HOST_CALL_PERMISSIONS.values()).isdisjoint(code.host)
        result = call_skill(code, command, precompiled,
                            read_request(request_fd, keep_open=host_calls))
        frame = encode_frame(result)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        write_all(result_fd, frame)
    except BaseException:  # noqa: BLE001 - a broken pipe or worse: the exit code says so
        status = EXIT_FRAME_FAILED
    os._exit(status)
