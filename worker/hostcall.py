"""The child's side of host calls: a skill asking its supervisor for an LLM generation or an
HTTP fetch, which the supervisor makes with the provider and network the skill does not have.

One call at a time: a `HostCall` frame on the result pipe, then the child blocks for one
`HostReply` frame on its request pipe (kept open only for skills granted a host-call
permission). The checks here spare the supervisor a call it would refuse anyway; it applies
every one of them again, trusting no frame. Shared by WASM's host functions (`worker.wasm`) and
a Python skill's `ctx.llm_generate` / `ctx.http_fetch` (`worker.runtime`).
"""

from __future__ import annotations

import msgspec

from worker.protocol import (
    HOST_CALL_PERMISSIONS,
    MAX_FETCH_REQUEST_BYTES,
    MAX_HOST_CALL_FRAME,
    MAX_HOST_CALLS,
    MAX_HOST_REPLY_FRAME,
    MAX_PROMPT_BYTES,
    MAX_URL_BYTES,
    REQUEST_FD,
    RESULT_FD,
    FrameError,
    HostCall,
    HostReply,
    decode_frame,
    encode_frame,
    read_frame,
    write_all,
)

_REPLY_DECODER = msgspec.msgpack.Decoder(HostReply)
#: Longest HTTP method name passed on (the `http_fetch` tool decides which it serves).
MAX_METHOD_CHARS = 16


class HostCallError(RuntimeError):
    """A host call refused or failed; the message says which and why."""


class HostCaller:
    """One execution's host calls: permission, count and size checks, then the exchange."""

    def __init__(self, permissions: frozenset[str] | set[str] | list[str]) -> None:
        self.permissions = frozenset(permissions)
        self.calls = 0
        self.broken = False

    def ask(self, call: HostCall) -> HostReply:
        """The supervisor's answer to `call`, or HostCallError naming why there is none."""
        kind = call.kind
        permission = HOST_CALL_PERMISSIONS.get(kind)
        if permission is None or permission not in self.permissions:
            raise HostCallError(f"{kind} refused: the manifest does not grant permission "
                                f"{permission!r} (permissions.host)")
        if len(call.prompt.encode("utf-8", "surrogatepass")) > MAX_PROMPT_BYTES:
            raise HostCallError(f"{kind} refused: the prompt is more than {MAX_PROMPT_BYTES} "
                                "bytes")
        if len(call.url.encode("utf-8", "surrogatepass")) > MAX_URL_BYTES \
                or len(call.body) > MAX_FETCH_REQUEST_BYTES \
                or len(call.method) > MAX_METHOD_CHARS:
            raise HostCallError(f"{kind} refused: the URL (at most {MAX_URL_BYTES} bytes), "
                                f"method (at most {MAX_METHOD_CHARS} characters) or body (at "
                                f"most {MAX_FETCH_REQUEST_BYTES} bytes) is too long")
        if self.broken:
            raise HostCallError(f"{kind} failed: the channel to the supervisor is broken")
        if self.calls >= MAX_HOST_CALLS:
            raise HostCallError(f"{kind} refused: this execution made its {MAX_HOST_CALLS} "
                                "host calls")
        self.calls += 1
        try:
            frame = encode_frame(call)
            if len(frame) > MAX_HOST_CALL_FRAME:
                raise FrameError(f"the call is {len(frame)} bytes")
            write_all(RESULT_FD, frame)
            reply: HostReply = decode_frame(read_frame(REQUEST_FD, MAX_HOST_REPLY_FRAME),
                                            _REPLY_DECODER)
        except (OSError, FrameError) as exc:
            self.broken = True
            raise HostCallError(f"{kind} failed: no answer from the supervisor ({exc})") from None
        if not reply.ok:
            raise HostCallError(f"{kind} failed: {reply.error}")
        return reply
