"""Host calls (`llm_generate`, `http_fetch`) from a hostile execution child.

The supervisor answers them with the operator's provider and fetcher, so it must not trust a
host-call frame: the attacks are a module (or a compromised child: here a Python skill granted
the same permission, writing raw frames on its result pipe) that floods calls, sends an
oversized prompt, sends garbage, or asks for a call its manifest does not grant. Each attack
has a control showing the same path reaches the provider (or hangs the execution) where the
cap or check does not apply.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from llm_stub import Reply, StubLLMServer, completion, running_stub

from sandbox import (
    ErrorKind,
    ExecutionRequest,
    ExecutionStatus,
    OpenAICompatibleProvider,
    Sandbox,
    Skill,
)
from worker.protocol import MAX_HOST_CALLS, MAX_PROMPT_BYTES

wasmtime = pytest.importorskip("wasmtime")
pytestmark = pytest.mark.timeout(90)

LLM_PERMISSION = '[permissions]\nhost = ["llm:generate"]\n'

#: Calls llm_generate COUNT times with the PROMPT_LEN bytes at 0 as the prompt, and answers
#: [hundreds, tens, ones] of the calls that worked.
FLOOD = """(module
  (import "env" "set_output" (func $set (param i32 i32)))
  (import "env" "llm_generate" (func $llm (param i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) "ping")
  (func $digit (param $at i32) (param $v i32)
    (i32.store8 (local.get $at) (i32.add (i32.const 48) (local.get $v))))
  (func (export "execute") (local $i i32) (local $ok i32)
    (block $done (loop $again
      (br_if $done (i32.ge_u (local.get $i) (i32.const COUNT)))
      (if (i32.ne (call $llm (i32.const 0) (i32.const PROMPT_LEN) (i32.const 70000))
                  (i32.const -1))
        (then (local.set $ok (i32.add (local.get $ok) (i32.const 1)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $again)))
    (i32.store8 (i32.const 300) (i32.const 91))
    (call $digit (i32.const 301) (i32.div_u (local.get $ok) (i32.const 100)))
    (i32.store8 (i32.const 302) (i32.const 44))
    (call $digit (i32.const 303)
      (i32.rem_u (i32.div_u (local.get $ok) (i32.const 10)) (i32.const 10)))
    (i32.store8 (i32.const 304) (i32.const 44))
    (call $digit (i32.const 305) (i32.rem_u (local.get $ok) (i32.const 10)))
    (i32.store8 (i32.const 306) (i32.const 93))
    (call $set (i32.const 300) (i32.const 7))))"""


def flood(count: int, prompt_len: int = 4) -> str:
    return FLOOD.replace("COUNT", str(count)).replace("PROMPT_LEN", str(prompt_len))


def calls_that_worked(result: Any) -> int:
    hundreds, tens, ones = result.json()
    return int(hundreds * 100 + tens * 10 + ones)


#: A compromised child: Python code with the execution child's fds, writing raw frames
#: (msgpack maps built by hand, as any code in the child could: nothing of the sandbox's own).
RAW = """import os, struct, time, types
import msgspec

def HostCall(**fields):
    return {"type": "host-call", **fields}

def encode_frame(message):
    body = msgspec.msgpack.encode(message)
    return struct.pack(">I", len(body)) + body

def send(data):
    view = memoryview(data)
    while view:
        view = view[os.write(3, view):]

def read_exactly(size):
    data = b""
    while len(data) < size:
        chunk = os.read(4, size - len(data))
        if not chunk:
            raise EOFError("no answer")
        data += chunk
    return data

def ask(call):
    send(encode_frame(call))
    (length,) = struct.unpack(">I", read_exactly(4))
    reply = msgspec.msgpack.decode(read_exactly(length))
    return types.SimpleNamespace(ok=reply.get("ok", False), error=reply.get("error", ""))

def run(input):
    ATTACK
"""


def raw_skill(directory: Path, attack: str, manifest_extra: str = LLM_PERMISSION) -> Skill:
    directory.mkdir()
    code = RAW.replace("ATTACK", "\n    ".join(attack.strip().splitlines()))
    (directory / "main.py").write_text(code)
    (directory / "skill.toml").write_text(f'id = "test/{directory.name}"\n'
                                          f'entrypoint = "main:run"\n{manifest_extra}\n')
    return Skill.from_dir(directory)


def wasm_skill(directory: Path, wat: str, manifest_extra: str = LLM_PERMISSION) -> Skill:
    directory.mkdir()
    (directory / "main.wasm").write_bytes(wasmtime.wat2wasm(wat))
    (directory / "skill.toml").write_text(
        f'id = "test/{directory.name}"\nwasm = "main.wasm"\n{manifest_extra}\n')
    return Skill.from_dir(directory)


@pytest.fixture
def stub() -> Iterator[StubLLMServer]:
    server = running_stub()
    stub = next(server)
    stub.reply = Reply(body=completion('"pong"', total_tokens=3))
    yield stub
    next(server, None)


def execute(make_sandbox: Callable[..., Sandbox], stub: StubLLMServer, skill: Skill,
            data: Any = None, **options: Any) -> Any:
    sandbox = make_sandbox(skill, warm=True, llm=OpenAICompatibleProvider(
        stub.base_url, "stub-model", api_key_env=None), **options)
    raw = b"{}" if data is None else json.dumps(data).encode()
    return sandbox.execute(ExecutionRequest(skill_id=skill.id, input=raw))


# -- a flood of host calls ---------------------------------------------------------------------

def test_module_flooding_llm_generate_reaches_the_provider_at_most_the_cap(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer) -> None:
    # control: every call of a short loop reaches the provider, so nothing but the cap stops
    # a long one
    control = execute(make_sandbox, stub, wasm_skill(tmp_path / "few", flood(5)))
    assert calls_that_worked(control) == 5 and len(stub.received) == 5
    assert control.resource_usage.tokens_used == 15
    stub.received.clear()

    result = execute(make_sandbox, stub, wasm_skill(tmp_path / "many", flood(300)))
    assert result.ok, (result.error, result.stderr)
    assert calls_that_worked(result) == MAX_HOST_CALLS
    assert len(stub.received) == MAX_HOST_CALLS
    assert f"made its {MAX_HOST_CALLS} host calls" in result.stderr
    assert result.resource_usage.tokens_used == 3 * MAX_HOST_CALLS


def test_child_asking_past_the_cap_is_killed_with_a_host_calls_verdict(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer) -> None:
    attack = """
replies = [ask(HostCall(kind="llm_generate", prompt="ping")) for _ in range(input["n"])]
return [reply.ok for reply in replies]
"""
    # control: up to the cap, each raw call is answered by the provider
    control = execute(make_sandbox, stub, raw_skill(tmp_path / "few", attack),
                      {"n": MAX_HOST_CALLS})
    assert control.ok, (control.error, control.stderr)
    assert control.json() == [True] * MAX_HOST_CALLS
    assert len(stub.received) == MAX_HOST_CALLS
    stub.received.clear()

    result = execute(make_sandbox, stub, raw_skill(tmp_path / "many", attack),
                     {"n": MAX_HOST_CALLS * 4})
    assert result.status is ExecutionStatus.FAILED
    assert result.error_kind is ErrorKind.RESOURCE_EXHAUSTED
    assert f"host calls: more than {MAX_HOST_CALLS}" in result.error
    assert len(stub.received) == MAX_HOST_CALLS
    assert result.resource_usage.tokens_used == 3 * MAX_HOST_CALLS  # counted by the supervisor


def test_child_pipelining_calls_without_waiting_is_killed(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer) -> None:
    attack = """
for _ in range(input["n"]):
    send(encode_frame(HostCall(kind="llm_generate", prompt="ping")))
time.sleep(60)
"""
    # control: one call sent without reading the answer is legal: the skill hangs to its
    # timeout, having reached the provider
    control = execute(make_sandbox, stub,
                      raw_skill(tmp_path / "one", attack,
                                LLM_PERMISSION + "[limits]\ntimeout = 3.0\n"), {"n": 1})
    assert control.status is ExecutionStatus.TIMEOUT
    assert len(stub.received) == 1
    stub.received.clear()

    result = execute(make_sandbox, stub, raw_skill(tmp_path / "many", attack), {"n": 50})
    assert result.status is ExecutionStatus.FAILED, result.error
    assert result.error_kind is ErrorKind.SKILL_FAILED
    assert "a second host call before the first was answered" in result.error
    assert len(stub.received) <= 1


# -- oversized requests ------------------------------------------------------------------------

def test_module_with_an_oversized_prompt_never_reaches_the_provider(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer) -> None:
    # control: a prompt of exactly the cap reaches the provider whole
    big_memory = FLOOD.replace("(memory (export \"memory\") 2)",
                               f"(memory (export \"memory\") {MAX_PROMPT_BYTES // 65536 + 4})")
    control = execute(make_sandbox, stub, wasm_skill(
        tmp_path / "fits", big_memory.replace("COUNT", "1").replace(
            "PROMPT_LEN", str(MAX_PROMPT_BYTES))))
    assert calls_that_worked(control) == 1
    assert len(stub.received) == 1  # (its zero bytes, JSON-escaped, overrun the stub's read)
    stub.received.clear()

    result = execute(make_sandbox, stub, wasm_skill(
        tmp_path / "over", big_memory.replace("COUNT", "1").replace(
            "PROMPT_LEN", str(MAX_PROMPT_BYTES + 1))))
    assert calls_that_worked(result) == 0
    assert "the prompt is" in result.stderr and str(MAX_PROMPT_BYTES) in result.stderr
    assert stub.received == []


def test_child_sending_an_oversized_prompt_is_refused_by_the_supervisor(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer) -> None:
    attack = """
reply = ask(HostCall(kind="llm_generate", prompt="x" * input["size"]))
return [reply.ok, reply.error]
"""
    control = execute(make_sandbox, stub, raw_skill(tmp_path / "fits", attack),
                      {"size": MAX_PROMPT_BYTES})
    assert control.json() == [True, ""]
    assert len(stub.received) == 1
    stub.received.clear()

    result = execute(make_sandbox, stub, raw_skill(tmp_path / "over", attack),
                     {"size": MAX_PROMPT_BYTES + 1})
    ok, error = result.json()
    assert not ok and "the prompt is" in error
    assert stub.received == []


def test_child_sending_a_huge_host_call_frame_is_killed(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer) -> None:
    attack = """
reply = ask(HostCall(kind="llm_generate", prompt="x" * input["size"]))
return reply.ok
"""
    result = execute(make_sandbox, stub, raw_skill(tmp_path / "huge", attack,
                                                   LLM_PERMISSION + "[limits]\n"
                                                   "max_output_bytes = 8388608\n"),
                     {"size": 4 << 20})
    assert result.status is ExecutionStatus.FAILED
    assert result.error_kind is ErrorKind.RESOURCE_EXHAUSTED
    assert "host calls: a host call of" in result.error
    assert stub.received == []


# -- garbage -----------------------------------------------------------------------------------

GARBAGE = {
    "undecodable": "send(b'\\x00\\x00\\x00\\x02\\xc1\\xc1')",
    "not a map": "send(encode_frame([1, 2, 3]))",
    "ill-typed call": "send(encode_frame({'type': 'host-call', 'kind': 5}))",
    "unknown kind": "send(encode_frame(HostCall(kind='exec_shell', prompt='id')))",
    "absurd length": "send(b'\\xff\\xff\\xff\\xf0')",
}


@pytest.mark.parametrize("garbage", list(GARBAGE))
def test_garbage_on_the_result_pipe_is_a_verdict_at_once_not_a_hang(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer,
        garbage: str) -> None:
    """The child writes garbage and then waits (as for an answer). Control: without host
    calls granted the supervisor reads the result pipe only at the end, and the same child
    hangs until its timeout: the host-call reader is what judges it at once."""
    attack = f"{GARBAGE[garbage]}\ntime.sleep(60)"
    control = execute(make_sandbox, stub, raw_skill(tmp_path / "control", attack,
                                                    "[limits]\ntimeout = 3.0\n"))
    assert control.status is ExecutionStatus.TIMEOUT

    result = execute(make_sandbox, stub, raw_skill(tmp_path / "attack", attack,
                                                   LLM_PERMISSION + "[limits]\n"
                                                   "timeout = 30.0\n"))
    assert result.status is ExecutionStatus.FAILED, (result.error, result.stderr)
    assert result.error_kind in (ErrorKind.SKILL_FAILED, ErrorKind.RESOURCE_EXHAUSTED)
    assert "frame" in result.error
    assert stub.received == []


# -- permissions, checked again in the supervisor ----------------------------------------------

def test_call_the_manifest_does_not_grant_is_refused_by_the_supervisor(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer) -> None:
    """The child's own gate is bypassed (raw frames): the supervisor refuses by itself."""
    attack = """
reply = ask(HostCall(kind=input["kind"], prompt="ping", url="http://127.0.0.1:9/",
                     method="GET"))
return [reply.ok, reply.error]
"""
    fetched: list[Any] = []

    def fetcher(arguments: dict[str, Any]) -> dict[str, Any]:
        fetched.append(arguments)
        return {"status": 200, "body": "fetched"}

    # control: the call granted (llm:generate) reaches the provider
    skill = raw_skill(tmp_path / "llm-only", attack)
    sandbox = make_sandbox(skill, warm=True, llm=OpenAICompatibleProvider(
        stub.base_url, "stub-model", api_key_env=None))
    sandbox.register_tool("http_fetch", fetcher)
    control = sandbox.execute(ExecutionRequest(skill_id=skill.id,
                                               input=b'{"kind": "llm_generate"}'))
    assert control.json() == [True, ""]
    assert len(stub.received) == 1

    result = sandbox.execute(ExecutionRequest(skill_id=skill.id,
                                              input=b'{"kind": "http_fetch"}'))
    ok, error = result.json()
    assert not ok and "'http:fetch'" in error
    assert fetched == []


def test_child_without_any_host_permission_gets_no_answer(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer) -> None:
    """No permission: the request pipe is closed after the input, the frame is never read as
    a call. Control: the same skill granted llm:generate is answered."""
    attack = """
try:
    return ask(HostCall(kind="llm_generate", prompt="ping")).ok
except Exception as exc:
    return type(exc).__name__
"""
    control = execute(make_sandbox, stub, raw_skill(tmp_path / "granted", attack))
    assert control.json() is True
    stub.received.clear()

    result = execute(make_sandbox, stub, raw_skill(tmp_path / "bare", attack, ""))
    assert result.status is ExecutionStatus.FAILED  # two frames on the result pipe
    assert "invalid result frame" in result.error
    assert stub.received == []


def test_unread_reply_does_not_let_a_skill_pass_its_exit_as_a_set_up_failure(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes left in the request pipe once meant "the child never read its request, so no
    skill code ran" (exit 71: a worker failure, which spares the skill's circuit). A reply
    the skill leaves unread must not count: it did run. Control: without the supervisor's
    note that the child wrote on its result pipe, the same exit passes as a worker failure."""
    from sandbox.execution import Execution

    attack = """
send(encode_frame(HostCall(kind="llm_generate", prompt="ping")))
deadline = time.monotonic() + 10
while time.monotonic() < deadline:  # until the reply waits in the pipe, unread
    import fcntl, termios
    if int.from_bytes(fcntl.ioctl(4, termios.FIONREAD, b"\\0\\0\\0\\0"), "little"):
        break
    time.sleep(0.01)
os._exit(71)
"""
    skill = raw_skill(tmp_path / "exit71", attack)
    result = execute(make_sandbox, stub, skill)
    assert result.status is ExecutionStatus.FAILED
    assert result.error_kind is ErrorKind.SKILL_FAILED, result.error
    assert len(stub.received) == 1

    monkeypatch.setattr(Execution, "result_seen", property(lambda self: False,
                                                           lambda self, value: None),
                        raising=False)
    control = execute(make_sandbox, stub, raw_skill(tmp_path / "control", attack))
    assert control.error_kind is ErrorKind.WORKER_FAILURE, control.error


# -- frames that made the supervisor raise, or work, or lose a call in flight -----------------

#: A result frame with one key the supervisor does not know, nested DEPTH arrays deep: msgspec
#: skips an unknown field by recursing into it. Built by hand (encoding it would recurse too).
DEEP_FRAME = """
body = (b"\\x83\\xa2ok\\xc3\\xa6output\\xc4\\x011\\xa1x" + b"\\x91" * input["depth"] + b"\\xc0")
send(struct.pack(">I", len(body)) + body)
os._exit(0)
"""


def _decode_frame_before_the_fix(data: bytes, decoder: Any) -> Any:
    """`worker.protocol.decode_frame` as it was: only msgspec's own errors are a bad frame."""
    import msgspec

    from worker.protocol import FRAME_HEADER, FrameError

    try:
        return decoder.decode(memoryview(data)[FRAME_HEADER.size:])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise FrameError(f"undecodable frame: {exc}") from None


@pytest.mark.parametrize("granted", [False, True], ids=["judged-at-the-end", "read-as-it-comes"])
def test_deeply_nested_result_frame_is_the_skills_failure_not_a_worker_failure(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer,
        monkeypatch: pytest.MonkeyPatch, granted: bool) -> None:
    """RecursionError out of the frame decoders escaped the execution: "worker failure", which
    blames the host, spares the skill's circuit breaker and logs a traceback each time.
    Control: without RecursionError among the bad-frame errors, the same frame does that."""
    import msgspec

    import sandbox.execution as execution

    manifest = LLM_PERMISSION if granted else ""
    shallow = execute(make_sandbox, stub, raw_skill(tmp_path / "shallow", DEEP_FRAME, manifest),
                      {"depth": 10})
    assert shallow.ok and shallow.json() == 1, shallow.error  # a valid frame, but for the depth

    result = execute(make_sandbox, stub, raw_skill(tmp_path / "deep", DEEP_FRAME, manifest),
                     {"depth": 100_000})
    assert result.status is ExecutionStatus.FAILED
    assert result.error_kind is ErrorKind.SKILL_FAILED, result.error
    assert "invalid result frame" in result.error
    assert stub.received == []

    monkeypatch.setattr(execution, "decode_frame", _decode_frame_before_the_fix)
    monkeypatch.setattr(execution, "_UNDECODABLE",
                        (msgspec.DecodeError, msgspec.ValidationError))
    control = execute(make_sandbox, stub, raw_skill(tmp_path / "control", DEEP_FRAME, manifest),
                      {"depth": 100_000})
    assert control.error_kind is ErrorKind.WORKER_FAILURE, control.error
    assert "RecursionError" in control.error


class _CountingDecoder:
    """Wraps the supervisor's frame-tag decoder: how many bytes it was given in all."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.bytes = 0

    def decode(self, body: bytes) -> Any:
        self.bytes += len(body)
        return self.inner.decode(body)


TRICKLE = """
body = msgspec.msgpack.encode({"ok": True, "output": b"1", "pad": b"x" * input["size"]})
send(struct.pack(">I", len(body)) + body)
for _ in range(input["bytes"]):
    os.write(3, b"\\0")
    time.sleep(0.001)
os._exit(0)
"""


def test_bytes_trickled_after_a_big_result_do_not_make_the_supervisor_decode_it_again(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A skill granted host calls has its result pipe parsed as it comes. After a big final
    frame, each byte it trickled made the supervisor copy and decode the whole frame again:
    ~1 µs of the skill's CPU bought milliseconds of the supervisor's. Control: without the
    note that the final frame was seen, the same skill makes it decode the frame per wake."""
    import sandbox.execution as execution
    from sandbox.execution import Execution

    size, trickled = 512 << 10, 300
    counter = _CountingDecoder(execution._FRAME_TYPE_DECODER)
    monkeypatch.setattr(execution, "_FRAME_TYPE_DECODER", counter)
    data = {"size": size, "bytes": trickled}
    result = execute(make_sandbox, stub, raw_skill(tmp_path / "attack", TRICKLE), data)
    assert result.status is ExecutionStatus.FAILED  # bytes after the frame: its own fault
    assert "unexpected bytes after the result frame" in result.error, result.error
    assert counter.bytes < 2 * size, counter.bytes  # once

    counter.bytes = 0
    monkeypatch.setattr(Execution, "final_seen", property(lambda self: False,
                                                          lambda self, value: None),
                        raising=False)
    control = execute(make_sandbox, stub, raw_skill(tmp_path / "control", TRICKLE), data)
    assert "unexpected bytes after the result frame" in control.error
    assert counter.bytes > 20 * size, counter.bytes  # once per wake


ABANDON = """
import threading, time

def run(input, ctx):
    threading.Thread(target=ctx.llm_generate, args=("ping",), daemon=True).start()
    time.sleep(0.2)  # the call is on its way; return without waiting for the answer
    return "done"
"""


def _abandoning_skill(tmp_path: Path) -> Skill:
    """A Python skill granted llm:generate that starts a call and returns without its answer."""
    skill_dir = tmp_path / "abandon"
    skill_dir.mkdir()
    (skill_dir / "main.py").write_text(ABANDON)
    (skill_dir / "skill.toml").write_text(f'id = "test/abandon"\nentrypoint = "main:run"\n'
                                          f'{LLM_PERMISSION}')
    return Skill.from_dir(skill_dir)


def test_call_left_in_flight_by_a_skill_that_returns_still_counts_its_tokens(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The provider generates (and bills) a call whether or not the skill waits for it. A
    skill that asked and returned at once left the call to be abandoned: its tokens never
    counted, its work outside the execution's slot. Control: without the wait for the call
    in flight, tokens_used says 0 for a generation the provider made."""
    from sandbox.hostcalls import HostChannel

    stub.reply = Reply(body=completion('"pong"', total_tokens=7), delay=1.0)
    skill = _abandoning_skill(tmp_path)
    result = execute(make_sandbox, stub, skill)
    assert result.ok and result.json() == "done", (result.error, result.stderr)
    assert len(stub.received) == 1
    assert result.resource_usage.tokens_used == 7
    stub.received.clear()

    monkeypatch.setattr(HostChannel, "settle", lambda self, deadline, cancel_fd: None)
    control = execute(make_sandbox, stub, skill)
    assert control.ok
    assert control.resource_usage.tokens_used == 0
    deadline = time.monotonic() + 10
    while not stub.received and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(stub.received) == 1  # the provider was asked all the same


def test_wait_for_a_call_left_in_flight_ends_at_the_callers_cancel(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox], stub: StubLLMServer) -> None:
    """The wait for a call the skill left behind is the execution's: a cancel ends it at once.
    Control: uncancelled, the same execution lasts as long as the provider takes."""
    import threading

    stub.reply = Reply(body=completion('"pong"', total_tokens=7), delay=4.0)
    skill = _abandoning_skill(tmp_path)
    sandbox = make_sandbox(skill, warm=True, llm=OpenAICompatibleProvider(
        stub.base_url, "stub-model", api_key_env=None))
    control = sandbox.execute(ExecutionRequest(skill_id=skill.id, input=b"{}"))
    assert control.ok and control.resource_usage.tokens_used == 7
    assert control.duration >= 3.5

    request = ExecutionRequest(skill_id=skill.id, input=b"{}")
    threading.Timer(1.0, sandbox.cancel, args=(request.request_id,)).start()
    result = sandbox.execute(request)
    assert result.duration < 3.0, result.duration
    assert result.resource_usage.tokens_used == 0  # abandoned at the caller's word
