"""WASM skills (`wasm = "main.wasm"`): openbotstack's own modules, and small modules built from
WAT text here, run by wasmtime inside the sandboxed execution child."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandbox import ErrorKind, ExecutionRequest, ExecutionStatus, Sandbox, Skill, SkillLoadError
from sandbox.execution import EXHAUSTED_ERROR
from tests.conftest import OPENBOTSTACK

wasmtime = pytest.importorskip("wasmtime")

REFERENCE = OPENBOTSTACK
HELLO = REFERENCE / "runtime-wasip1" / "hello-world" / "main.wasm"
TAX = REFERENCE / "runtime-v1.1.0" / "tax-calculator" / "main.wasm"
needs_reference = pytest.mark.skipif(not (HELLO.is_file() and TAX.is_file()),
                                     reason="openbotstack reference modules not present")

MakeWasm = Callable[..., Skill]


@pytest.fixture
def wasm_skill(tmp_path: Path) -> MakeWasm:
    """`wasm_skill(wat=... | module=path, manifest_extra="")` → a loaded skill whose skill.toml
    points at `main.wasm` in its directory: built from WAT, or a copy of `module` (a module
    must lie inside its skill's directory)."""
    counter = iter(range(1_000_000))

    def make(wat: str | None = None, module: Path | None = None,
             manifest_extra: str = "") -> Skill:
        index = next(counter)
        directory = tmp_path / f"wasm{index}"
        directory.mkdir()
        if wat is not None:
            (directory / "main.wasm").write_bytes(wasmtime.wat2wasm(wat))
        else:
            assert module is not None
            shutil.copyfile(module, directory / "main.wasm")
        (directory / "skill.toml").write_text(
            f'id = "test/wasm{index}"\nwasm = "main.wasm"\n{manifest_extra}\n')
        return Skill.from_dir(directory)

    return make


def run(make_sandbox: Callable[..., Sandbox], skill: Skill, data: Any = None,
        times: int = 1) -> list[Any]:
    sandbox = make_sandbox(skill, warm=True)
    raw = b"{}" if data is None else json.dumps(data).encode()
    return [sandbox.execute(ExecutionRequest(skill_id=skill.id, input=raw))
            for _ in range(times)]


TAX_LIMITS = "[limits]\nmemory_mb = 8\ncpu_time = 1.0\ntimeout = 5.0\n"


@needs_reference
@pytest.mark.timeout(120)
def test_hello_world_go_wasip1_command_answers_as_its_tests_expect(
        make_sandbox: Callable[..., Sandbox], wasm_skill: MakeWasm) -> None:
    skill = wasm_skill(module=HELLO, manifest_extra='[permissions]\nhost = ["log:write"]\n'
                                                   "[limits]\nmemory_mb = 64\ntimeout = 10.0\n")
    sandbox = make_sandbox(skill, warm=True)  # the ~2-6 s compile at load, not in a request
    expected = {
        "hello there!": "Hello! I'm the hello-world skill. How can I help you?",
        "What's your name?": "I'm the OpenBotStack hello-world skill!",
        "help": "I can respond to greetings. Try saying 'hello' or ask my name!",
        "version": "hello-world skill v1.0.0",
    }
    for message, answer in expected.items():
        result = sandbox.execute(ExecutionRequest(
            skill_id=skill.id, input=json.dumps({"message": message}).encode()))
        assert result.ok, result.error
        assert result.json()["message"] == answer
        assert result.resource_usage.cpu_time_ms > 0


@needs_reference
@pytest.mark.timeout(120)
def test_tax_calculator_tinygo_reactor_within_its_manifest_limits(
        make_sandbox: Callable[..., Sandbox], wasm_skill: MakeWasm) -> None:
    """8 MB of linear memory, 1,000 ms of CPU, 5 s: its manifest's own figures."""
    skill = wasm_skill(module=TAX, manifest_extra=TAX_LIMITS)
    sandbox = make_sandbox(skill, warm=True)
    cases = [({"amount": 100.0, "region": "US", "category": "goods"}, 0.08, 8.0, 108.0),
             ({"amount": 50.0, "region": "EU", "category": "digital"}, 0.23, 11.5, 61.5),
             ({"amount": 1000.0, "region": "CN", "category": "services"}, 0.06, 60.0, 1060.0)]
    for data, rate, tax, total in cases:
        result = sandbox.execute(ExecutionRequest(skill_id=skill.id,
                                                  input=json.dumps(data).encode()))
        assert result.ok, result.error
        answer = result.json()
        assert answer["tax_rate"] == pytest.approx(rate)
        assert answer["tax_amount"] == pytest.approx(tax)
        assert answer["total_amount"] == pytest.approx(total)
        assert 0 < result.resource_usage.cpu_time_ms < 1000
        assert result.resource_usage.memory_mb < 64


@needs_reference
@pytest.mark.timeout(120)
def test_tax_calculator_below_its_linear_memory_need_runs_out_of_memory(
        make_sandbox: Callable[..., Sandbox], wasm_skill: MakeWasm) -> None:
    """It peaks at exactly 8 MiB: with 7 the store refuses its heap's growth, which TinyGo
    requests in one chunk far below the limit, so the verdict is its own failure (exit 2),
    with its own words on stderr."""
    skill = wasm_skill(module=TAX, manifest_extra=TAX_LIMITS.replace("= 8", "= 7"))
    [result] = run(make_sandbox, skill, {"amount": 100.0, "region": "US", "category": "goods"})
    assert result.status is ExecutionStatus.FAILED
    assert "status 2" in result.error
    assert "out of memory" in result.stderr


# -- modules built from WAT ------------------------------------------------------------------

ECHO_REACTOR = """
(module
  (import "env" "get_input_len" (func $len (result i32)))
  (import "env" "get_input" (func $get (param i32) (result i32)))
  (import "env" "set_output" (func $set (param i32 i32)))
  (memory (export "memory") 1)
  (func (export "execute")
    (drop (call $get (i32.const 0)))
    (call $set (i32.const 0) (call $len))))
"""

ECHO_COMMAND = """
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 60000))
    (drop (call $read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (i32.store (i32.const 4) (i32.load (i32.const 8)))
    (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 12)))))
"""


def test_reactor_module_reads_input_and_answers_through_env(
        make_sandbox: Callable[..., Sandbox], wasm_skill: MakeWasm) -> None:
    [result] = run(make_sandbox, wasm_skill(ECHO_REACTOR), {"n": [1, 2, 3]})
    assert result.ok, result.error
    assert result.json() == {"n": [1, 2, 3]}


def test_wasi_command_module_reads_stdin_and_answers_on_stdout(
        make_sandbox: Callable[..., Sandbox], wasm_skill: MakeWasm) -> None:
    [result] = run(make_sandbox, wasm_skill(ECHO_COMMAND), {"word": "hello"})
    assert result.ok, result.error
    assert result.json() == {"word": "hello"}
    assert result.stdout == ""  # the module's stdout is its answer, not the execution's stdout


def test_trap_is_a_failure_with_the_trap_message(make_sandbox: Callable[..., Sandbox],
                                                 wasm_skill: MakeWasm) -> None:
    wat = '(module (memory (export "memory") 1) (func (export "execute") unreachable))'
    [result] = run(make_sandbox, wasm_skill(wat))
    assert result.status is ExecutionStatus.FAILED
    assert result.error_kind is ErrorKind.SKILL_FAILED
    assert "wasm trap" in result.error and "unreachable" in result.error


def test_nonzero_wasi_exit_is_a_failure_naming_the_status(
        make_sandbox: Callable[..., Sandbox], wasm_skill: MakeWasm) -> None:
    wat = """(module
      (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") 1)
      (func (export "_start") (call $exit (i32.const 3))))"""
    [result] = run(make_sandbox, wasm_skill(wat))
    assert result.status is ExecutionStatus.FAILED
    assert result.error_kind is ErrorKind.SKILL_FAILED
    assert "status 3" in result.error


@pytest.mark.timeout(60)
def test_infinite_loop_ends_as_cpu_exhaustion(make_sandbox: Callable[..., Sandbox],
                                              wasm_skill: MakeWasm) -> None:
    wat = '(module (memory (export "memory") 1) (func (export "execute") (loop br 0)))'
    skill = wasm_skill(wat, manifest_extra="[limits]\ncpu_time = 0.5\ntimeout = 20.0\n")
    [result] = run(make_sandbox, skill)
    assert result.status is ExecutionStatus.FAILED
    assert result.error_kind is ErrorKind.RESOURCE_EXHAUSTED
    assert result.error.startswith(f"{EXHAUSTED_ERROR}: cpu time")


@pytest.mark.timeout(60)
def test_unbounded_recursion_is_a_stack_trap_and_the_process_survives_to_report_it(
        make_sandbox: Callable[..., Sandbox], wasm_skill: MakeWasm) -> None:
    """wasmtime's own stack limit stops the recursion (a trap the module caused: its failure),
    long before the process's stack rlimit would kill the child without a word."""
    wat = """(module (memory (export "memory") 1)
      (func $down (param i64) (result i64)
        (i64.add (call $down (i64.add (local.get 0) (i64.const 1))) (i64.const 1)))
      (func (export "execute") (drop (call $down (i64.const 0)))))"""
    [result, again] = run(make_sandbox, wasm_skill(wat), times=2)
    assert result.status is ExecutionStatus.FAILED
    assert result.error_kind is ErrorKind.SKILL_FAILED
    assert "wasm trap" in result.error and "stack" in result.error, result.error
    assert (again.status, again.error_kind) == (result.status, result.error_kind)


@pytest.mark.timeout(60)
def test_a_module_that_burns_no_fuel_is_stopped_by_the_wall_timeout_beneath(
        make_sandbox: Callable[..., Sandbox], wasm_skill: MakeWasm) -> None:
    """Fuel only counts instructions: a module asleep in a WASI call for a minute spends none,
    so the layer beneath, the supervisor's wall timeout on the whole process, ends it."""
    wat = """(module
      (import "wasi_snapshot_preview1" "poll_oneoff"
        (func $poll (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "_start")
        (i32.store8 (i32.const 8) (i32.const 0))                 ;; tag: clock
        (i32.store (i32.const 16) (i32.const 1))                 ;; monotonic clock
        (i64.store (i32.const 24) (i64.const 60000000000))       ;; 60 s, relative
        (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))))"""
    skill = wasm_skill(wat, manifest_extra="[limits]\ncpu_time = 0.5\ntimeout = 1.0\n")
    [result] = run(make_sandbox, skill)
    assert result.status is ExecutionStatus.TIMEOUT, result.error
    assert result.resource_usage.cpu_time_ms < 500


GROW = """(module
  (memory (export "memory") 1)
  (func (export "execute")
    (loop $more
      (br_if $more (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
    unreachable))"""


def test_linear_memory_growth_stops_at_memory_mb(make_sandbox: Callable[..., Sandbox],
                                                 wasm_skill: MakeWasm) -> None:
    """memory.grow fails at the store's limit (the module sees -1, then traps here): a memory
    verdict, not the process's RLIMIT_DATA nor the host's memory."""
    skill = wasm_skill(GROW, manifest_extra="[limits]\nmemory_mb = 16\n")
    [result] = run(make_sandbox, skill)
    assert result.status is ExecutionStatus.FAILED
    assert result.error_kind is ErrorKind.RESOURCE_EXHAUSTED
    assert result.error.startswith(f"{EXHAUSTED_ERROR}: memory")
    assert "16 MiB" in result.error


def test_module_declaring_more_memory_than_allowed_is_a_memory_verdict(
        make_sandbox: Callable[..., Sandbox], wasm_skill: MakeWasm) -> None:
    wat = '(module (memory (export "memory") 1024) (func (export "execute")))'  # 64 MiB
    skill = wasm_skill(wat, manifest_extra="[limits]\nmemory_mb = 16\n")
    [result] = run(make_sandbox, skill)
    assert result.error_kind is ErrorKind.RESOURCE_EXHAUSTED
    assert result.error.startswith(f"{EXHAUSTED_ERROR}: memory")


def test_no_state_survives_between_executions(make_sandbox: Callable[..., Sandbox],
                                              wasm_skill: MakeWasm) -> None:
    """A global, linear memory and the key-value store, each written by one execution, are
    fresh in the next: every execution instantiates the module in a new store."""
    wat = """(module
      (import "env" "set_output" (func $set (param i32 i32)))
      (import "env" "kv_get" (func $kv_get (param i32 i32 i32) (result i32)))
      (import "env" "kv_set" (func $kv_set (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (global $count (mut i32) (i32.const 0))
      (data (i32.const 0) "k")
      (func (export "execute")
        (global.set $count (i32.add (global.get $count) (i32.const 1)))
        ;; memory[100] counts too; the kv value at key "k" is one byte from memory[200]
        (i32.store8 (i32.const 100) (i32.add (i32.load8_u (i32.const 100)) (i32.const 1)))
        (i32.store8 (i32.const 201)
          (i32.add (i32.const 48) (call $kv_get (i32.const 0) (i32.const 1) (i32.const 200))))
        (i32.store8 (i32.const 200) (i32.const 49))
        (drop (call $kv_set (i32.const 0) (i32.const 1) (i32.const 200) (i32.const 1)))
        ;; answer [global, memory, kv length seen] as "[g,m,k]"
        (i32.store8 (i32.const 300) (i32.const 91))
        (i32.store8 (i32.const 301) (i32.add (i32.const 48) (global.get $count)))
        (i32.store8 (i32.const 302) (i32.const 44))
        (i32.store8 (i32.const 303) (i32.add (i32.const 48) (i32.load8_u (i32.const 100))))
        (i32.store8 (i32.const 304) (i32.const 44))
        (i32.store8 (i32.const 305) (i32.load8_u (i32.const 201)))
        (i32.store8 (i32.const 306) (i32.const 93))
        (call $set (i32.const 300) (i32.const 7))))"""
    skill = wasm_skill(wat, manifest_extra='[permissions]\nhost = ["kv:read", "kv:write"]\n')
    results = run(make_sandbox, skill, times=3)
    assert [result.json() for result in results] == [[1, 1, 0]] * 3


HOST_CALLS = """(module
  (import "env" "set_output" (func $set (param i32 i32)))
  (import "env" "llm_generate" (func $llm (param i32 i32 i32) (result i32)))
  (import "env" "http_fetch" (func $fetch (param i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "kv_set" (func $kv_set (param i32 i32 i32 i32) (result i32)))
  (import "env" "log" (func $log (param i32 i32 i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "http://127.0.0.1:9/GETinfohi")
  (func $digit (param $at i32) (param $v i32)
    (i32.store8 (local.get $at) (i32.add (i32.const 48) (local.get $v))))
  (func (export "execute")
    ;; [llm == -1, fetch == 0, kv_set == 0]
    (i32.store8 (i32.const 300) (i32.const 91))
    (call $digit (i32.const 301)
      (i32.eq (call $llm (i32.const 0) (i32.const 4) (i32.const 1000)) (i32.const -1)))
    (i32.store8 (i32.const 302) (i32.const 44))
    (call $digit (i32.const 303)
      (i32.eqz (call $fetch (i32.const 0) (i32.const 19) (i32.const 19) (i32.const 3)
                            (i32.const 0) (i32.const 0) (i32.const 1000))))
    (i32.store8 (i32.const 304) (i32.const 44))
    (call $digit (i32.const 305)
      (i32.eqz (call $kv_set (i32.const 0) (i32.const 1) (i32.const 0) (i32.const 1))))
    (i32.store8 (i32.const 306) (i32.const 93))
    (call $log (i32.const 22) (i32.const 4) (i32.const 26) (i32.const 2))
    (call $set (i32.const 300) (i32.const 7))))"""


def test_host_functions_without_permission_fail_with_a_clear_error(
        make_sandbox: Callable[..., Sandbox], wasm_skill: MakeWasm) -> None:
    [result] = run(make_sandbox, wasm_skill(HOST_CALLS))
    assert result.ok, result.error
    assert result.json() == [1, 1, 1]  # openbotstack's error values
    for function, permission in [("llm_generate", "llm:generate"),
                                 ("http_fetch", "http:fetch"), ("kv_set", "kv:write"),
                                 ("log", "log:write")]:
        assert f"{function} refused" in result.stderr and repr(permission) in result.stderr
    assert "[info] hi" not in result.stderr


def test_llm_and_http_with_permission_but_no_provider_fail_clearly(
        make_sandbox: Callable[..., Sandbox], wasm_skill: MakeWasm) -> None:
    skill = wasm_skill(HOST_CALLS, manifest_extra='[permissions]\nhost = ["llm:generate", '
                                                  '"http:fetch", "log:write"]\n')
    [result] = run(make_sandbox, skill)
    assert result.json() == [1, 1, 1]
    assert "no LLM provider is configured" in result.stderr
    assert "no HTTP fetcher is configured" in result.stderr
    assert "[info] hi" in result.stderr  # log:write granted


@pytest.mark.parametrize("module", ["/etc/passwd", "../outside.wasm", "link.wasm"])
def test_a_module_outside_the_skill_directory_is_a_load_error(tmp_path: Path,
                                                              module: str) -> None:
    """The zygote reads the module before its layers: a manifest must not point it at host
    files (absolute, `..`, or a symlink out). Control: the same module inside loads."""
    directory = tmp_path / "skill"
    directory.mkdir()
    outside = tmp_path / "outside.wasm"
    outside.write_bytes(wasmtime.wat2wasm("(module)"))
    (directory / "link.wasm").symlink_to(outside)
    (directory / "skill.toml").write_text(f'id = "test/out"\nwasm = "{module}"\n')
    with pytest.raises(SkillLoadError, match="outside the skill's directory"):
        Skill.from_dir(directory)
    shutil.copyfile(outside, directory / "inside.wasm")
    (directory / "skill.toml").write_text('id = "test/out"\nwasm = "inside.wasm"\n')
    assert Skill.from_dir(directory).manifest.wasm == "inside.wasm"


def test_missing_module_file_is_a_load_error_naming_the_field(tmp_path: Path) -> None:
    (tmp_path / "skill.toml").write_text('id = "test/nomodule"\nwasm = "absent.wasm"\n')
    with pytest.raises(SkillLoadError, match=r"field 'wasm'.*absent\.wasm"):
        Skill.from_dir(tmp_path)


def test_without_the_runtime_package_a_wasm_skill_fails_at_load(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import wasm

    (tmp_path / "main.wasm").write_bytes(wasmtime.wat2wasm("(module)"))
    (tmp_path / "skill.toml").write_text('id = "test/noruntime"\nwasm = "main.wasm"\n')
    monkeypatch.setattr(wasm, "runtime_available", lambda: False)
    with pytest.raises(SkillLoadError, match=r"'wasmtime'.*not installed"):
        Skill.from_dir(tmp_path)


def test_module_without_an_entry_fails_the_skill_naming_the_exports(
        make_sandbox: Callable[..., Sandbox], wasm_skill: MakeWasm) -> None:
    skill = wasm_skill('(module (func (export "main")))')
    with pytest.raises(SkillLoadError, match="neither 'execute'"):
        make_sandbox(skill, warm=True)


def test_python_skill_zygote_never_loads_the_wasm_runtime(
        run_skill: Callable[..., Any]) -> None:
    """wasmtime is imported in a WASM skill's zygote only; this test process has it loaded
    (the control: the supervisor's modules do not travel to a zygote, a fresh interpreter)."""
    import sys

    assert "wasmtime" in sys.modules
    result = run_skill("import sys\ndef run(input):\n    return 'wasmtime' in sys.modules\n")
    assert result.ok, result.error
    assert result.json() is False


def _big_data_module(data_kib: int) -> str:
    """A reactor whose linear memory starts with `data_kib` KiB of initialised data (a JSON
    string it answers the first 4 bytes of)."""
    pages = data_kib // 64 + 2
    filler = "a" * (data_kib * 1024 - 4)
    return f"""(module
      (import "env" "set_output" (func $set (param i32 i32)))
      (memory (export "memory") {pages})
      (data (i32.const 0) "\\22ok\\22{filler}")
      (func (export "execute") (call $set (i32.const 0) (i32.const 4))))"""


_UNDER_FSIZE = """
import resource, sys, wasmtime
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
engine = wasmtime.Engine()
linker = wasmtime.Linker(engine)
linker.define_func("env", "set_output", wasmtime.FuncType(
    [wasmtime.ValType.i32()] * 2, []), lambda ptr, length: None)
module = wasmtime.Module(engine, open(sys.argv[1], "rb").read())
try:
    linker.instantiate(wasmtime.Store(engine), module)
except wasmtime.WasmtimeError as exc:
    print(str(exc).splitlines()[0])
else:
    print("instantiated")
"""


@pytest.mark.timeout(60)
def test_initialised_data_larger_than_max_file_bytes_still_run(
        make_sandbox: Callable[..., Sandbox], wasm_skill: MakeWasm, tmp_path: Path) -> None:
    """wasmtime writes a module's initialised memory to a memfd at its first instantiation,
    in the execution: RLIMIT_FSIZE from the skill's max_file_bytes must not fail that write
    (the module itself can write no file)."""
    import subprocess
    import sys

    wat = _big_data_module(2048)
    skill = wasm_skill(wat=wat, manifest_extra="[limits]\nmax_file_bytes = 1048576\n")
    [result] = run(make_sandbox, skill)
    assert result.ok, (result.error, result.stderr)
    assert result.json() == "ok"
    # Control: wasmtime under that RLIMIT_FSIZE, as the execution ran before, cannot even
    # instantiate the module.
    module = tmp_path / "big.wasm"
    module.write_bytes(wasmtime.wat2wasm(wat))
    plain = subprocess.run([sys.executable, "-c", _UNDER_FSIZE, str(module)],
                           capture_output=True, text=True, timeout=60)
    assert "File too large" in plain.stdout, (plain.stdout, plain.stderr)


def _answering(digit: str) -> str:
    """A reactor answering the JSON number `digit`."""
    return f"""(module
      (import "env" "set_output" (func $set (param i32 i32)))
      (memory (export "memory") 1)
      (data (i32.const 0) "{digit}")
      (func (export "execute") (call $set (i32.const 0) (i32.const 1))))"""


def _restart(sandbox: Sandbox, skill: Skill) -> None:
    """Kill the skill's zygote: the next execution boots it again."""
    import psutil

    from tests.conftest import wait_until_gone

    pid = sandbox.zygote_info(skill.id)["pid"]
    psutil.Process(pid).kill()
    assert wait_until_gone({pid}) == set()


@pytest.mark.timeout(60)
def test_a_wasm_zygote_boots_again_from_its_compiled_module_never_holding_it_after(
        make_sandbox: Callable[..., Sandbox], wasm_skill: MakeWasm) -> None:
    skill = wasm_skill(wat=_answering("1"))
    sandbox = make_sandbox(skill, warm=True)
    assert sandbox.zygote_info(skill.id)["wasm_module"] == "compiled"
    for _ in range(2):  # a crash, then another: each boot deserializes the kept module
        _restart(sandbox, skill)
        result = sandbox.execute(ExecutionRequest(skill_id=skill.id, input=b"{}"))
        assert result.ok and result.json() == 1, result
        info = sandbox.zygote_info(skill.id)
        assert info["wasm_module"] == "cached", info
        links = [os.readlink(f"/proc/{info['pid']}/fd/{fd}")
                 for fd in os.listdir(f"/proc/{info['pid']}/fd")]
        assert not [link for link in links if "sbx-wasm-artifact" in link], links
    sandbox.unload_skill(skill.id)
    assert len(sandbox._modules) == 0  # unloading lets the compiled module go


@pytest.mark.timeout(60)
def test_a_module_changed_on_disk_is_compiled_afresh_not_taken_from_the_kept_one(
        make_sandbox: Callable[..., Sandbox], wasm_skill: MakeWasm) -> None:
    """The kept artifact is native code made from the module's old bytes: a zygote booting
    after the file changed must compile the new bytes, never run the old code."""
    skill = wasm_skill(wat=_answering("1"))
    sandbox = make_sandbox(skill, warm=True)
    assert sandbox.execute(ExecutionRequest(skill_id=skill.id, input=b"{}")).json() == 1
    (skill.path / "main.wasm").write_bytes(wasmtime.wat2wasm(_answering("2")))
    _restart(sandbox, skill)
    result = sandbox.execute(ExecutionRequest(skill_id=skill.id, input=b"{}"))
    assert result.ok and result.json() == 2, result
    assert sandbox.zygote_info(skill.id)["wasm_module"] == "compiled"
