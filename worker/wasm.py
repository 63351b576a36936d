"""WASM skills: a WebAssembly module run by wasmtime inside the execution child.

The WASM sandbox sits on top of the OS layers, not instead of them: the module is compiled once
in the skill's zygote (compiling a Go module costs ~2-6 s of CPU; openbotstack recompiled it on
every call), before the zygote's seccomp filter and Landlock ruleset are installed, and every
execution child — forked with the compiled code in its copy-on-write memory — builds a fresh
`Store` and instance, so no global, linear memory or key-value entry survives an execution. The
rlimits, cgroups, namespaces, seccomp and Landlock of the child apply beneath wasmtime exactly
as they do beneath a Python skill.

Two shapes of module, as openbotstack runs them (`execute` preferred over `_start`):
- a WASI *command* (`_start`; e.g. Go's wasip1): the JSON input on stdin, the answer on stdout;
- a *reactor* exporting `execute` (e.g. TinyGo with `_initialize`): the input through the host
  module `env` (`get_input_len`, `get_input`), the answer through `set_output`.

The host module `env` follows openbotstack-runtime's `sandbox/wasm/hostapi.go`: same names,
signatures and error values (0xFFFFFFFF or 0). `log`, `kv_get`/`kv_set`, `llm_generate` and
`http_fetch` each need their openbotstack permission (`log:write`, `kv:read`, `kv:write`,
`llm:generate`, `http:fetch`); a call without it gets the error value and one line on the
execution's stderr saying why. The key-value store lives and dies with the execution (nothing
persists between executions). `llm_generate` and `http_fetch` are answered by the supervisor,
which holds the LLM provider (and its key) and the operator's fetcher: the child writes a
bounded `HostCall` frame on its result pipe and blocks reading the `HostReply` on its request
pipe (`_ask`); the child itself never opens a connection. The supervisor checks the permission
and every bound again, counts the tokens, and its wall deadline covers the wait.

WASI gets no preopened directory, no environment variable, only `argv[0]`: the module sees no
file of the host. Its stdout is collected in memory up to `max_output_bytes`; its stderr is the
execution's stderr (capped by the supervisor).

CPU: fuel (`cpu_time` times `FUEL_PER_CPU_SECOND`, deterministic: an infinite loop ends as
"resource exhausted: cpu time" in the child itself) beneath RLIMIT_CPU and the wall deadline.
Memory: the store's limit on linear memory is the manifest's `memory_mb` (openbotstack's
`max_memory_mb` is a linear-memory figure: tax-calculator needs exactly 8 MiB); RLIMIT_DATA and
the cgroup still cap the whole process above the zygote's baseline.

wasmtime is imported here only, and only in a WASM skill's zygote (`prepare`): no other worker
process loads it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import sys
from collections.abc import Callable
from typing import Any

from worker import isolation
from worker.hostcall import HostCaller, HostCallError
from worker.protocol import (
    MAX_FETCH_REQUEST_BYTES,
    MAX_PROMPT_BYTES,
    MAX_URL_BYTES,
    ChildResult,
    ExecutionInput,
    ForkCommand,
    HostCall,
    HostReply,
    SkillCode,
    write_all,
)

#: The Python package that runs WASM skills (the `wasm` extra).
RUNTIME_PACKAGE = "wasmtime"
_MIB = 1 << 20
_PAGE = 1 << 16
#: Fuel per second of the manifest's cpu_time: roughly what a tight WASM loop burns per CPU
#: second on the development machine (measured: ~1.3e9/s), so fuel and RLIMIT_CPU end a
#: runaway module at about the same point, fuel first and deterministically.
FUEL_PER_CPU_SECOND = 1_000_000_000
#: openbotstack's error value for calls returning a length or pointer.
ERROR_U32 = -1  # 0xFFFFFFFF as wasm sees an i32
HOST_PERMISSIONS = {
    "log": "log:write", "kv_get": "kv:read", "kv_set": "kv:write",
    "llm_generate": "llm:generate", "http_fetch": "http:fetch",
}


class WasmModuleError(ValueError):
    """The module cannot run as a skill (does not compile, no entry, unknown imports)."""


class _Compiled:
    """What the zygote prepared once: engine, compiled module, linker with the host module."""

    def __init__(self, engine: Any, module: Any, linker: Any, reactor: bool,
                 initialize: bool) -> None:
        self.engine = engine
        self.module = module
        self.linker = linker
        self.reactor = reactor
        self.initialize = initialize


class _Execution:
    """Per-execution host state: input, output, the key-value store, what was refused."""

    def __init__(self, code: SkillCode, command: ForkCommand, data: bytes) -> None:
        self.input = data
        self.output: bytes | None = None
        self.stdout = bytearray()
        self.overflow = 0  # bytes the module tried to answer beyond max_output_bytes
        self.max_output = command.limits.max_output_bytes
        self.permissions = frozenset(code.host)
        self.kv: dict[bytes, bytes] = {}
        self.kv_bytes = 0
        self.kv_cap = (code.wasm_memory_mb or command.limits.memory_mb) * _MIB
        self.noted: set[str] = set()
        self.host = HostCaller(code.host)

    def note(self, text: str) -> None:
        """One stderr line per distinct refusal (a module calling in a loop floods nothing)."""
        if text not in self.noted and len(self.noted) < 64:
            self.noted.add(text)
            os.write(2, f"skill-sandbox: wasm: {text}\n".encode())

    def allowed(self, function: str) -> bool:
        permission = HOST_PERMISSIONS[function]
        if permission in self.permissions:
            return True
        self.note(f"{function} refused: the manifest does not grant permission "
                  f"{permission!r} (permissions.host)")
        return False

    def collect_stdout(self, data: bytes) -> int:
        room = self.max_output - len(self.stdout)
        if len(data) > room:
            self.stdout += data[:max(room, 0)]
            self.overflow += len(data) - max(room, 0)
            return -errno.EFBIG  # the write fails: the module learns it said too much
        self.stdout += data
        return len(data)


_compiled: _Compiled | None = None
_current: _Execution | None = None


def runtime_available() -> bool:
    """Whether the WASM runtime package is installed (checked at skill load)."""
    import importlib.util

    return importlib.util.find_spec(RUNTIME_PACKAGE) is not None


class Prepared:
    """How `prepare` got its module: "compiled" (then `artifact` is a sealed memfd of the
    compiled module for the supervisor to keep, made from the module with digest `sha256`) or
    "cached" (deserialized from the artifact it was given)."""

    def __init__(self, how: str, sha256: str, artifact: int = -1) -> None:
        self.how = how
        self.sha256 = sha256
        self.artifact = artifact


def prepare(code: SkillCode, artifact: int = -1, artifact_sha256: str = "") -> Prepared:
    """In the zygote, before its layers: compile the module once and link the host module.

    A compile takes seconds for a Go module, at every boot (after each eviction too): so the
    first boot hands the supervisor the compiled module (wasmtime's serialized artifact, in a
    sealed memfd) and later boots get it back as `artifact`, deserialized in under a
    millisecond. wasmtime trusts an artifact as native code, so it is only ever made here (the
    zygote before its layers) and used only for the module it was made from: one whose bytes
    now have another digest is compiled afresh.

    No thread is started (serial compilation): the zygote forks afterwards, and a user
    namespace can only be entered by a single-threaded process.
    """
    global _compiled
    try:
        import wasmtime
    except ImportError as exc:
        raise WasmModuleError(f"WASM skills need the Python package {RUNTIME_PACKAGE!r} "
                              "(pip install 'skill-sandbox[wasm]')") from exc
    config = wasmtime.Config()
    config.consume_fuel = True
    config.parallel_compilation = False
    # No shared memory (the default; said here because a shared memory is the one kind a
    # store's memory limit would not bound in the same way).
    config.wasm_threads = False
    config.shared_memory = False
    engine = wasmtime.Engine(config)
    data = _module_bytes(code)
    digest = hashlib.sha256(data).hexdigest()
    module = None
    if artifact >= 0 and artifact_sha256 == digest:
        try:  # another wasmtime or engine config is refused here: compiled afresh then
            # Read into memory: deserialize_file would keep the memfd open in the zygote.
            module = wasmtime.Module.deserialize(engine, _read_all(artifact))
        except (wasmtime.WasmtimeError, OSError):
            module = None
    compiled = module is None
    if module is None:
        try:
            module = wasmtime.Module(engine, data)
        except (wasmtime.WasmtimeError, OSError) as exc:
            raise WasmModuleError(f"{code.wasm}: {str(exc).splitlines()[0]}") from None
    exports = {export.name for export in module.exports}
    if "execute" not in exports and "_start" not in exports:
        raise WasmModuleError(f"{code.wasm}: exports neither 'execute' (reactor) nor '_start' "
                              "(WASI command)")
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    _define_env(wasmtime, linker)
    known = {(item.module, item.name) for item in module.imports
             if item.module == "wasi_snapshot_preview1" or (item.module == "env"
                                                            and item.name in _ENV_NAMES)}
    unknown = [f"{item.module}.{item.name}" for item in module.imports
               if (item.module, item.name) not in known]
    if unknown:
        raise WasmModuleError(f"{code.wasm}: imports what this host does not provide: "
                              f"{', '.join(unknown[:8])}")
    # Each execution's first instantiation writes the module's initialised memory to a memfd
    # (copy-on-write image; filling memory by copying instead made compiling 10x slower).
    # wasmtime keeps that image within max(1 MiB, twice the data bytes), and the data lie in
    # the module's bytes; the module itself can open no file to write.
    isolation.allow_runtime_files(2 * len(data) + _MIB)
    _compiled = _Compiled(engine, module, linker, reactor="execute" in exports,
                          initialize="_initialize" in exports)
    if compiled:
        return Prepared("compiled", digest, _sealed(module.serialize()))
    return Prepared("cached", digest)


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


def _sealed(data: bytes | bytearray) -> int:
    """A memfd holding `data` that nobody can change any more (sealed), or -1 if one cannot
    be made (the skill still runs; its next boot compiles again)."""
    try:
        fd = os.memfd_create("sbx-wasm-artifact", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError:
        return -1
    try:
        write_all(fd, data)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK
                    | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    except OSError:
        os.close(fd)
        return -1
    return fd


def _module_bytes(code: SkillCode) -> bytes:
    """The module's bytes, read only from a regular file that really lies in the skill's
    directory and fits the zygote's compile budget. The zygote reads it as root before its
    layers, after the supervisor checked the path at load: a symlink swapped in since must
    not make it read (and run as the skill) a host file, a FIFO stall it, a device fill it."""
    from worker.isolation import (
        COMPILE_MEMORY_MB,
        MAX_WASM_BYTES,
        ConfinedFileError,
        read_confined,
    )

    try:
        data = read_confined(code.wasm, code.skill_dir, MAX_WASM_BYTES)
    except OSError as exc:
        raise WasmModuleError(f"{code.wasm}: {exc.strerror}") from None
    except ConfinedFileError as exc:
        if exc.size:
            raise WasmModuleError(f"{code.wasm}: the module is {exc.size} bytes, more than the "
                                  f"{MAX_WASM_BYTES} a zygote compiles (compiling takes about "
                                  f"4x that, within {COMPILE_MEMORY_MB} MiB)") from None
        raise WasmModuleError(f"{code.wasm}: {exc}") from None
    if not data:
        raise WasmModuleError(f"{code.wasm}: the module is empty")
    return data


# -- the host module `env` ------------------------------------------------------------------

def _state() -> _Execution:
    if _current is None:  # only reachable if a module ran outside `call`
        raise HostCallError("no execution")
    return _current


def _memory(caller: Any) -> Any:
    memory = caller.get("memory")
    if memory is None:
        raise HostCallError("the module exports no 'memory'")
    return memory


def _read(caller: Any, ptr: int, length: int) -> bytes | None:
    """Guest bytes [ptr, ptr+length), or None when out of bounds (wasm's i32s are unsigned)."""
    ptr, length = ptr & 0xFFFFFFFF, length & 0xFFFFFFFF
    memory = _memory(caller)
    if ptr + length > memory.data_len(caller):
        return None
    return bytes(memory.read(caller, ptr, ptr + length))


def _write(caller: Any, ptr: int, data: bytes) -> bool:
    ptr = ptr & 0xFFFFFFFF
    memory = _memory(caller)
    if ptr + len(data) > memory.data_len(caller):
        return False
    memory.write(caller, data, ptr)
    return True


def _get_input_len() -> int:
    return len(_state().input)


def _get_input(caller: Any, ptr: int) -> int:
    data = _state().input
    if not data:
        return 0
    return len(data) if _write(caller, ptr, data) else ERROR_U32


def _set_output(caller: Any, ptr: int, length: int) -> None:
    state = _state()
    if (length & 0xFFFFFFFF) > state.max_output:
        state.overflow = max(state.overflow, (length & 0xFFFFFFFF) - state.max_output)
        return
    data = _read(caller, ptr, length)
    if data is not None:
        state.output = data


def _log(caller: Any, level_ptr: int, level_len: int, msg_ptr: int, msg_len: int) -> None:
    state = _state()
    if not state.allowed("log"):
        return
    level = _read(caller, level_ptr, min(level_len & 0xFFFFFFFF, 32)) or b""
    message = _read(caller, msg_ptr, min(msg_len & 0xFFFFFFFF, 1 << 16)) or b""
    os.write(2, b"[" + level.replace(b"\n", b" ") + b"] " + message.replace(b"\n", b" ")
             + b"\n")


def _kv_get(caller: Any, key_ptr: int, key_len: int, value_ptr: int) -> int:
    state = _state()
    key = _read(caller, key_ptr, key_len)
    if key is None or not state.allowed("kv_get"):
        return 0
    value = state.kv.get(key)
    if value is None:
        return 0
    return len(value) if _write(caller, value_ptr, value) else ERROR_U32


def _kv_set(caller: Any, key_ptr: int, key_len: int, value_ptr: int, value_len: int) -> int:
    state = _state()
    key = _read(caller, key_ptr, key_len)
    value = _read(caller, value_ptr, value_len)
    if key is None or value is None or not state.allowed("kv_set"):
        return 0
    grown = len(key) + len(value) - (len(key) + len(state.kv[key]) if key in state.kv else 0)
    if state.kv_bytes + grown > state.kv_cap:
        state.note(f"kv_set refused: the store would exceed {state.kv_cap} bytes")
        return 0
    state.kv[key] = value
    state.kv_bytes += grown
    return 1


def _ask(state: _Execution, call: HostCall) -> HostReply | None:
    """The supervisor's answer to `call`, or None (the reason noted on stderr). The module is
    blocked meanwhile; the supervisor's wall deadline keeps running."""
    try:
        return state.host.ask(call)
    except HostCallError as exc:
        state.note(str(exc))
        return None


def _llm_generate(caller: Any, prompt_ptr: int, prompt_len: int, result_ptr: int) -> int:
    state = _state()
    if not state.allowed("llm_generate"):
        return ERROR_U32
    if (prompt_len & 0xFFFFFFFF) > MAX_PROMPT_BYTES:
        state.note(f"llm_generate refused: the prompt is {prompt_len & 0xFFFFFFFF} bytes, "
                   f"more than {MAX_PROMPT_BYTES}")
        return ERROR_U32
    prompt = _read(caller, prompt_ptr, prompt_len)
    if prompt is None:
        return ERROR_U32
    reply = _ask(state, HostCall(kind="llm_generate",
                                 prompt=prompt.decode("utf-8", "replace")))
    if reply is None:
        return ERROR_U32
    return len(reply.data) if _write(caller, result_ptr, reply.data) else ERROR_U32


def _http_fetch(caller: Any, url_ptr: int, url_len: int, method_ptr: int, method_len: int,
                body_ptr: int, body_len: int, resp_ptr: int) -> int:
    state = _state()
    if not state.allowed("http_fetch"):
        return 0
    if (url_len & 0xFFFFFFFF) > MAX_URL_BYTES or (method_len & 0xFFFFFFFF) > 16 \
            or (body_len & 0xFFFFFFFF) > MAX_FETCH_REQUEST_BYTES:
        state.note(f"http_fetch refused: the URL (at most {MAX_URL_BYTES} bytes), method or "
                   f"body (at most {MAX_FETCH_REQUEST_BYTES} bytes) is too long")
        return 0
    url = _read(caller, url_ptr, url_len)
    method = _read(caller, method_ptr, method_len)
    body = _read(caller, body_ptr, body_len) if body_len else b""
    if url is None or method is None or body is None:
        return 0
    reply = _ask(state, HostCall(kind="http_fetch", url=url.decode("utf-8", "replace"),
                                 method=method.decode("utf-8", "replace"), body=body))
    if reply is None:
        return 0
    answer = reply.data
    status = reply.status
    if not _write(caller, resp_ptr, (status & 0xFFFFFFFF).to_bytes(4, "little") + answer):
        return ERROR_U32
    return ((status & 0xFFFF) << 16) | (len(answer) & 0xFFFF)


#: name -> (parameter count, returns an i32, function, takes the caller)
_ENV: dict[str, tuple[int, bool, Callable[..., Any], bool]] = {
    "get_input_len": (0, True, _get_input_len, False),
    "get_input": (1, True, _get_input, True),
    "set_output": (2, False, _set_output, True),
    "log": (4, False, _log, True),
    "kv_get": (3, True, _kv_get, True),
    "kv_set": (4, True, _kv_set, True),
    "llm_generate": (3, True, _llm_generate, True),
    "http_fetch": (7, True, _http_fetch, True),
}
_ENV_NAMES = frozenset(_ENV)


def _define_env(wasmtime: Any, linker: Any) -> None:
    i32 = wasmtime.ValType.i32()
    for name, (params, returns, function, caller) in _ENV.items():
        kind = wasmtime.FuncType([i32] * params, [i32] if returns else [])
        linker.define_func("env", name, kind, function, access_caller=caller)


# -- one execution --------------------------------------------------------------------------

def _stdin_from(data: bytes) -> None:
    """The input as fd 0, from memory (no file, no path for Landlock to allow)."""
    memory = os.memfd_create("stdin", os.MFD_CLOEXEC)
    write_all(memory, data)
    os.lseek(memory, 0, os.SEEK_SET)
    os.dup2(memory, 0)
    os.close(memory)


def _at_memory_limit(store: Any, instance: Any, limit: int) -> bool:
    """Whether a failed module's linear memory had reached its limit (within an eighth of
    it, at least 1 MiB: runtimes grow in chunks). wasmtime's Python API does not report a
    refused memory.grow; a runtime that asks for a big chunk far below the limit (TinyGo
    doubles its heap) fails as the module's own error, with its own words on stderr."""
    memory = instance.exports(store).get("memory") if instance is not None else None
    try:
        return memory is not None and (memory.data_len(store)
                                       + max(_MIB, limit // 8) > limit)
    except Exception:  # noqa: BLE001 - no usable memory: not a memory verdict
        return False


def _trap_message(exc: Exception) -> str:
    """The trap's own message (`unreachable`, out of bounds...), without the backtrace."""
    text = str(getattr(exc, "message", None) or exc)
    cause = text.rpartition("Caused by:")[2] if "Caused by:" in text else text
    lines = [line.strip() for line in cause.splitlines() if line.strip()]
    message = lines[0][:500] if lines else type(exc).__name__
    return message if message.startswith("wasm trap") else f"wasm trap: {message}"


def _output_exhausted(limits: Any, state: _Execution) -> ChildResult:
    return ChildResult(ok=False, limit="output",
                       error=f"output is more than {limits.max_output_bytes} bytes "
                             f"({state.overflow} bytes past the limit)")


def call(code: SkillCode, command: ForkCommand, request: ExecutionInput) -> ChildResult:
    """Run the prepared module once on `request` in a fresh store; never raises."""
    global _current
    import wasmtime

    compiled = _compiled
    if compiled is None:
        return ChildResult(ok=False, error="the WASM module was not prepared in the zygote")
    limits = command.limits
    memory_mb = code.wasm_memory_mb or limits.memory_mb
    memory_limit = memory_mb * _MIB
    state = _current = _Execution(code, command, request.input)
    # wasmtime's WASI runs on a tokio pool of one worker per CPU: one is plenty, and more
    # would count against max_processes on a many-core host.
    os.environ["TOKIO_WORKER_THREADS"] = "1"
    store = wasmtime.Store(compiled.engine)
    store.set_limits(memory_size=memory_limit, table_elements=max(memory_limit // 16, 10_000),
                     instances=1, tables=4, memories=1)
    fuel = max(int(limits.cpu_time * FUEL_PER_CPU_SECOND), 1)
    store.set_fuel(fuel)
    wasi = wasmtime.WasiConfig()
    wasi.argv = ["main.wasm"]  # no env, no preopened directory: no host file is visible
    if not compiled.reactor:
        _stdin_from(request.input)
        wasi.inherit_stdin()
    wasi.stdout_custom = state.collect_stdout
    wasi.inherit_stderr()
    store.set_wasi(wasi)
    instance = None
    exit_code = 0
    try:
        instance = compiled.linker.instantiate(store, compiled.module)
        exports = instance.exports(store)
        if compiled.reactor:
            if compiled.initialize:
                exports["_initialize"](store)
            exports["execute"](store)
        else:
            exports["_start"](store)
    except wasmtime.ExitTrap as exc:
        exit_code = exc.code
    except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
        message = _trap_message(exc)
        if state.overflow:  # it kept writing past the cap until its fuel ran out
            return _output_exhausted(limits, state)
        if store.get_fuel() == 0:
            return ChildResult(ok=False, limit="cpu time",
                               error=f"the module used all its fuel ({fuel}: "
                                     f"{limits.cpu_time:g}s of CPU)")
        if _at_memory_limit(store, instance, memory_limit) or "memory minimum" in message:
            return ChildResult(ok=False, limit="memory", error=f"linear memory at its limit of "
                                                              f"{memory_mb} MiB: {message}")
        return ChildResult(ok=False, error=message)
    finally:
        sys.stdout.flush()
    if state.overflow:
        return _output_exhausted(limits, state)
    if exit_code != 0:
        if _at_memory_limit(store, instance, memory_limit):
            return ChildResult(ok=False, limit="memory",
                               error=f"linear memory at its limit of {memory_mb} MiB; "
                                     f"the module exited with status {exit_code}")
        return ChildResult(ok=False, error=f"the module exited with status {exit_code}")
    stdout = bytes(state.stdout)
    if compiled.reactor:
        output = state.output if state.output is not None else stdout
    else:
        output = stdout or (state.output or b"")
    output = output.strip() or b"null"
    return ChildResult(ok=True, output=output)
