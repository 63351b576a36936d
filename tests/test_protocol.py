"""The wire: length-prefixed msgpack frames round-trip, anything malformed is a `FrameError` and
nothing else, and a skill that writes its own forged, truncated, garbage or oversized frame to
the result pipe gets a `failed` result while the sandbox keeps serving."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox import (
    CircuitOpen,
    ErrorKind,
    ExecutionCanceled,
    ExecutionRequest,
    ExecutionResult,
    ExecutionStatus,
    ExecutionTimeout,
    InvalidInput,
    PolicyRejected,
    ResourceExhausted,
    ResourceUsage,
    Sandbox,
    SandboxError,
    Skill,
    SkillFailed,
    SkillNotLoaded,
    WorkerFailure,
)
from worker.protocol import (
    FRAME_HEADER,
    ChildExited,
    ChildResult,
    ChildStarted,
    FrameError,
    ReportMessage,
    decode_frame,
    encode_frame,
)

RESULT_DECODER = msgspec.msgpack.Decoder(ChildResult)
REPORT_DECODER = msgspec.msgpack.Decoder(ReportMessage)
FAST = settings(max_examples=200, deadline=None, database=None)

text = st.text(max_size=200)
child_results = st.builds(
    ChildResult, ok=st.booleans(), output=st.binary(max_size=2000), error=text, limit=text,
    tokens_used=st.integers(min_value=0, max_value=2**63 - 1),
)
reports = st.one_of(
    st.builds(ChildStarted, pid=st.integers(1, 2**31), zygote_rss_kb=st.integers(0, 2**40)),
    st.builds(ChildExited, pid=st.integers(1, 2**31), wait_status=st.integers(0, 2**16),
              utime=st.floats(0, 1e6), stime=st.floats(0, 1e6),
              maxrss_kb=st.integers(0, 2**40)),
)


# -- frames -------------------------------------------------------------------------------------


@FAST
@given(child_results)
def test_child_result_frames_round_trip(message: ChildResult) -> None:
    frame = encode_frame(message)
    (length,) = FRAME_HEADER.unpack_from(frame)
    assert length == len(frame) - FRAME_HEADER.size
    assert decode_frame(frame, RESULT_DECODER) == message


@FAST
@given(reports)
def test_tagged_report_frames_round_trip(message: ChildStarted | ChildExited) -> None:
    assert decode_frame(encode_frame(message), REPORT_DECODER) == message


@FAST
@given(st.builds(ExecutionRequest, skill_id=text, input=st.binary(max_size=500),
                 timeout=st.none() | st.floats(0.001, 1e6), tenant_id=text, user_id=text))
def test_execution_requests_round_trip(request: ExecutionRequest) -> None:
    decoder = msgspec.msgpack.Decoder(ExecutionRequest)
    assert decode_frame(encode_frame(request), decoder) == request


@FAST
@given(st.binary(max_size=300))
def test_garbage_never_raises_anything_but_frame_error(data: bytes) -> None:
    for decoder in (RESULT_DECODER, REPORT_DECODER):
        try:
            decoded = decode_frame(data, decoder)
        except FrameError:
            continue
        assert isinstance(decoded, ChildResult | ChildStarted | ChildExited)


@FAST
@given(st.binary(max_size=300))
def test_garbage_body_behind_a_correct_length_is_a_frame_error_or_a_valid_result(
        body: bytes) -> None:
    try:
        decoded = decode_frame(FRAME_HEADER.pack(len(body)) + body, RESULT_DECODER)
    except FrameError as exc:
        assert str(exc)
    else:
        assert isinstance(decoded, ChildResult)


@FAST
@given(child_results, st.data())
def test_every_truncation_of_a_frame_is_a_frame_error(message: ChildResult,
                                                      data: st.DataObject) -> None:
    frame = encode_frame(message)
    cut = data.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(FrameError, match=r"short frame|truncated frame"):
        decode_frame(frame[:cut], RESULT_DECODER)


@FAST
@given(child_results, st.binary(min_size=1, max_size=50))
def test_bytes_after_a_frame_are_a_frame_error(message: ChildResult, extra: bytes) -> None:
    with pytest.raises(FrameError, match="unexpected bytes after the result frame"):
        decode_frame(encode_frame(message) + extra, RESULT_DECODER)


def test_frame_of_the_wrong_message_type_is_a_frame_error() -> None:
    frame = encode_frame(ChildStarted(pid=1, zygote_rss_kb=2))
    with pytest.raises(FrameError, match="undecodable frame"):
        decode_frame(frame, RESULT_DECODER)


def test_missing_request_id_gets_a_fresh_uuid() -> None:
    first, second = ExecutionRequest(skill_id="x"), ExecutionRequest(skill_id="x")
    assert len(first.request_id) == 32 and first.request_id != second.request_id
    assert ExecutionRequest(skill_id="x", request_id="mine").request_id == "mine"


def test_statuses_are_openbotstacks_strings() -> None:
    assert [status.value for status in ExecutionStatus] == [
        "success", "failed", "timeout", "canceled", "rejected"]
    assert ExecutionStatus("timeout") is ExecutionStatus.TIMEOUT


# -- raise_for_status ---------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "kind", "expected"), [
    (ExecutionStatus.REJECTED, ErrorKind.SKILL_NOT_LOADED, SkillNotLoaded),
    (ExecutionStatus.TIMEOUT, ErrorKind.TIMEOUT, ExecutionTimeout),
    (ExecutionStatus.TIMEOUT, ErrorKind.NO_SLOT, ExecutionTimeout),
    (ExecutionStatus.REJECTED, ErrorKind.CIRCUIT_OPEN, CircuitOpen),
    (ExecutionStatus.FAILED, ErrorKind.RESOURCE_EXHAUSTED, ResourceExhausted),
    (ExecutionStatus.REJECTED, ErrorKind.POLICY_REJECTED, PolicyRejected),
    (ExecutionStatus.REJECTED, ErrorKind.INVALID_INPUT, InvalidInput),
    (ExecutionStatus.CANCELED, ErrorKind.CANCELED, ExecutionCanceled),
    (ExecutionStatus.FAILED, ErrorKind.SKILL_FAILED, SkillFailed),
    (ExecutionStatus.FAILED, ErrorKind.WORKER_FAILURE, WorkerFailure),
    # Results without a kind (built by hand, or by an older peer) map by status alone.
    (ExecutionStatus.TIMEOUT, ErrorKind.NONE, ExecutionTimeout),
    (ExecutionStatus.CANCELED, ErrorKind.NONE, ExecutionCanceled),
    (ExecutionStatus.REJECTED, ErrorKind.NONE, PolicyRejected),
    (ExecutionStatus.FAILED, ErrorKind.NONE, SkillFailed),
])
@pytest.mark.parametrize("error", ["", "ValueError: bad", "runtime: circuit breaker open"])
def test_raise_for_status_maps_each_outcome_to_its_exception_by_kind_never_by_text(
        status: ExecutionStatus, kind: ErrorKind, expected: type[SandboxError],
        error: str) -> None:
    result = ExecutionResult(status=status, error=error, error_kind=kind)
    with pytest.raises(expected) as caught:
        result.raise_for_status()
    assert type(caught.value) is expected
    assert isinstance(caught.value, SandboxError)
    assert caught.value.result is result
    assert str(caught.value).startswith(expected.message)
    if error:
        assert error in str(caught.value)


def test_raise_for_status_returns_a_success_unchanged() -> None:
    result = ExecutionResult(status=ExecutionStatus.SUCCESS, output=b"1",
                             resource_usage=ResourceUsage(cpu_time_ms=3))
    assert result.raise_for_status() is result
    assert result.ok and result.json() == 1


def test_invalid_input_is_a_policy_rejection() -> None:
    assert issubclass(InvalidInput, PolicyRejected)


# -- hostile result frames, end to end ----------------------------------------------------------

WRITE_AND_EXIT = """\
import os, struct
from worker.protocol import ChildResult, ChildStarted, encode_frame

def run(input):
    os.write(3, {payload})
    os._exit(0)
"""
HEALTHY = "def run(input):\n    return {'still': 'serving'}\n"

HOSTILE_FRAMES = {
    "truncated": ("encode_frame(ChildResult(ok=True, output=b'{}'))[:-3]",
                  "invalid result frame: truncated frame"),
    "short header": ("b'\\x00\\x00'", "invalid result frame: short"),
    "garbage": ("b'\\xde\\xad\\xbe\\xef' * 64",
                "invalid result frame"),
    "huge length, short body": ("struct.pack('>I', 2**31) + b'x' * 100",
                                "invalid result frame: truncated"),
    "trailing bytes": ("encode_frame(ChildResult(ok=True, output=b'1')) + b'more'",
                       "invalid result frame: 4 unexpected bytes"),
    "wrong message type": ("encode_frame(ChildStarted(pid=1, zygote_rss_kb=1))",
                           "invalid result frame: undecodable"),
    "forged non-JSON output": ("encode_frame(ChildResult(ok=True, output=b'\\xff not json'))",
                               "invalid output: not JSON"),
    "forged empty output": ("encode_frame(ChildResult(ok=True))", "invalid output: not JSON"),
    "forged output past the cap": (
        "encode_frame(ChildResult(ok=True, output=b'\"' + b'a' * 5000 + b'\"'))",
        "runtime: resource exhausted: output: result is 5002 bytes, limit is 4096"),
    "oversized stream": ("struct.pack('>I', 2**30) + b'x' * (1 << 20)",
                         "runtime: resource exhausted: output: result exceeds 4096 bytes"),
}


@pytest.mark.parametrize("name", list(HOSTILE_FRAMES))
def test_hostile_result_frame_is_a_failed_result_and_the_sandbox_keeps_serving(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path], name: str) -> None:
    payload, expected = HOSTILE_FRAMES[name]
    hostile = Skill.from_dir(skill_dir(WRITE_AND_EXIT.format(payload=payload),
                                       "[limits]\nmax_output_bytes = 4096\ntimeout = 5",
                                       skill_id="hostile/frame"))
    healthy = Skill.from_dir(skill_dir(HEALTHY, skill_id="hostile/healthy"))
    sandbox = make_sandbox(hostile, healthy)
    result = sandbox.execute(ExecutionRequest(skill_id=hostile.id))
    assert result.status is ExecutionStatus.FAILED
    assert result.error.startswith(expected), result.error
    assert result.output == b""
    for _ in range(2):  # the same zygote serves the next executions, hostile or not
        again = sandbox.execute(ExecutionRequest(skill_id=hostile.id))
        assert again.status is ExecutionStatus.FAILED
        assert again.error.startswith(expected), again.error
        ok = sandbox.execute(ExecutionRequest(skill_id=healthy.id))
        assert ok.ok and ok.json() == {"still": "serving"}
    assert sandbox.zygote_info(hostile.id)["starts"] == 1


def test_frame_written_next_to_the_real_one_fails_the_execution(
        run_skill: Callable[..., ExecutionResult]) -> None:
    code = ("import os\nfrom worker.protocol import ChildResult, encode_frame\n"
            "def run(input):\n"
            "    os.write(3, encode_frame(ChildResult(ok=True, output=b'\"forged\"')))\n"
            "    return 'real'\n")
    result = run_skill(code)
    assert result.status is ExecutionStatus.FAILED
    assert "unexpected bytes after the result frame" in result.error


def test_forged_token_count_cannot_go_negative(run_skill: Callable[..., Any]) -> None:
    code = ("import os\nfrom worker.protocol import ChildResult, encode_frame\n"
            "def run(input):\n"
            "    os.write(3, encode_frame(ChildResult(ok=True, output=b'1', tokens_used=-5)))\n"
            "    os._exit(0)\n")
    result = run_skill(code)
    assert result.ok
    assert result.resource_usage.tokens_used == 0


def test_closing_the_result_pipe_without_a_frame_is_failed(
        run_skill: Callable[..., ExecutionResult]) -> None:
    result = run_skill("import os\ndef run(input):\n    os.close(3)\n    os._exit(0)\n")
    assert result.status is ExecutionStatus.FAILED
    assert result.error == "skill exited with status 0 without a result"


def test_frame_bytes_on_stdout_are_just_output_text(
        run_skill: Callable[..., ExecutionResult]) -> None:
    code = ("import os\nfrom worker.protocol import ChildResult, encode_frame\n"
            "def run(input):\n"
            "    os.write(1, encode_frame(ChildResult(ok=True, output=b'\"forged\"')))\n"
            "    return 'real'\n")
    result = run_skill(code)
    assert result.ok and result.json() == "real"


def test_length_prefix_is_big_endian_four_bytes() -> None:
    frame = encode_frame(ChildResult(ok=True, output=b"x" * 300))
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
