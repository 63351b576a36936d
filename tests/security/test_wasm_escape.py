"""A hostile WASM module: what it can reach through WASI and the host module `env`, and what
it can make the supervisor believe. Each attack has a control: the same module under a plain
wasmtime set-up (a preopened directory, the inherited environment), or the same fd written
by a Python skill, shows the attack is real where the sandbox does not stop it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandbox import ErrorKind, ExecutionRequest, ExecutionStatus, Sandbox, Skill
from sandbox.execution import EXHAUSTED_ERROR
from tests.security.hostile import requires
from tests.test_wasm import ECHO_REACTOR

wasmtime = pytest.importorskip("wasmtime")

WASI = "wasi_snapshot_preview1"
ROOT = Path(__file__).resolve().parents[2]


def load(tmp_path: Path, wat: str, manifest_extra: str = "") -> Skill:
    directory = tmp_path / "skill"
    directory.mkdir()
    (directory / "main.wasm").write_bytes(wasmtime.wat2wasm(wat))
    (directory / "skill.toml").write_text(f'id = "test/hostile-wasm"\nwasm = "main.wasm"\n'
                                          f"{manifest_extra}\n")
    return Skill.from_dir(directory)


def execute(make_sandbox: Callable[..., Sandbox], skill: Skill) -> Any:
    sandbox = make_sandbox(skill, warm=True)
    return sandbox.execute(ExecutionRequest(skill_id=skill.id, input=b"{}"))


def plain_wasmtime(wat: str, configure: Callable[[Any], None]) -> bytes:
    """The module run by wasmtime in this process, set up by `configure(wasi)`: the control."""
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    wasi = wasmtime.WasiConfig()
    out: list[bytes] = []
    wasi.stdout_custom = out.append
    configure(wasi)
    store.set_wasi(wasi)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    instance = linker.instantiate(store, wasmtime.Module(engine, wat))
    instance.exports(store)["_start"](store)
    return b"".join(out)


def _print_digits(value: str) -> str:
    """WAT that writes `value` (an i32 expression, 0..9999) on stdout as a JSON string of 4
    decimal digits."""
    return f"""
    (local.set $v {value})
    (i32.store8 (i32.const 199) (i32.const 34))
    (i32.store8 (i32.const 204) (i32.const 34))
    (i32.store8 (i32.const 203) (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
    (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
    (i32.store8 (i32.const 202) (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
    (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
    (i32.store8 (i32.const 201) (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
    (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
    (i32.store8 (i32.const 200) (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
    (i32.store (i32.const 300) (i32.const 199))
    (i32.store (i32.const 304) (i32.const 6))
    (drop (call $fd_write (i32.const 1) (i32.const 300) (i32.const 1) (i32.const 308)))"""


#: fd_prestat_get(3): 0 when a directory is preopened as fd 3, EBADF (8) when none is.
PREOPEN_PROBE = f"""(module
  (import "{WASI}" "fd_prestat_get" (func $prestat (param i32 i32) (result i32)))
  (import "{WASI}" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (local $v i32)
    {_print_digits("(call $prestat (i32.const 3) (i32.const 100))")}))"""

#: environ_sizes_get: how many environment variables the module sees.
ENV_PROBE = f"""(module
  (import "{WASI}" "environ_sizes_get" (func $sizes (param i32 i32) (result i32)))
  (import "{WASI}" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (local $v i32)
    (drop (call $sizes (i32.const 100) (i32.const 104)))
    {_print_digits("(i32.load (i32.const 100))")}))"""


def test_wasm_module_sees_no_preopened_directory(make_sandbox: Callable[..., Sandbox],
                                                 tmp_path: Path) -> None:
    control = plain_wasmtime(PREOPEN_PROBE, lambda wasi: wasi.preopen_dir(str(tmp_path), "/"))
    assert control == b'"0000"'  # with a preopen, fd 3 is a directory the module may open
    result = execute(make_sandbox, load(tmp_path, PREOPEN_PROBE))
    assert result.ok, result.error
    assert result.json() == "0008"  # EBADF: no file of the host is reachable through WASI


def test_wasm_module_sees_no_environment(make_sandbox: Callable[..., Sandbox],
                                         tmp_path: Path) -> None:
    control = plain_wasmtime(ENV_PROBE, lambda wasi: wasi.inherit_env())
    assert int(json.loads(control)) > 0  # this test process's environment
    skill = load(tmp_path, ENV_PROBE, '[permissions]\nenv = { SECRET_TOKEN = "hunter2" }\n')
    result = execute(make_sandbox, skill)
    assert result.ok, result.error
    assert result.json() == "0000"  # neither the supervisor's nor the manifest's env


FLOOD = f"""(module
  (import "{WASI}" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 65536))
    (loop $again
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
      (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
      (br $again))))"""


@pytest.mark.timeout(60)
def test_stdout_flood_ends_as_output_exhaustion_with_bounded_capture(
        make_sandbox: Callable[..., Sandbox], tmp_path: Path) -> None:
    """A module writing stdout and stderr forever, ignoring errors: its answer stops at
    max_output_bytes (the writes fail beyond it), the verdict is the output limit (not the
    fuel it then burns), and the captured stderr stays within its cap."""
    skill = load(tmp_path, FLOOD, "[limits]\nmax_output_bytes = 100000\ncpu_time = 1.0\n")
    result = execute(make_sandbox, skill)
    assert result.status is ExecutionStatus.FAILED
    assert result.error_kind is ErrorKind.RESOURCE_EXHAUSTED
    assert result.error.startswith(f"{EXHAUSTED_ERROR}: output")
    assert len(result.stderr) <= 200_000


def test_set_output_beyond_the_cap_is_output_exhaustion(make_sandbox: Callable[..., Sandbox],
                                                        tmp_path: Path) -> None:
    wat = """(module
      (import "env" "set_output" (func $set (param i32 i32)))
      (memory (export "memory") 1)
      (func (export "execute") (call $set (i32.const 0) (i32.const -16))))"""
    result = execute(make_sandbox, load(tmp_path, wat))
    assert result.error_kind is ErrorKind.RESOURCE_EXHAUSTED
    assert result.error.startswith(f"{EXHAUSTED_ERROR}: output")


FORGE = f"""(module
  (import "{WASI}" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "env" "set_output" (func $set (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "\\00\\00\\00\\05\\82\\a2ok\\c3")
  (func (export "execute") (local $v i32)
    (i32.store (i32.const 300) (i32.const 0))
    (i32.store (i32.const 304) (i32.const 9))
    ;; the execution child's fds 3 and 4 are its result and request pipes: try both
    (local.set $v (i32.add
      (call $fd_write (i32.const 3) (i32.const 300) (i32.const 1) (i32.const 308))
      (call $fd_write (i32.const 4) (i32.const 300) (i32.const 1) (i32.const 308))))
    (i32.store8 (i32.const 400) (i32.add (i32.const 48) (i32.div_u (local.get $v) (i32.const 10))))
    (i32.store8 (i32.const 401) (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
    (call $set (i32.const 400) (i32.const 2))))"""


def test_wasm_module_cannot_write_the_result_pipe(make_sandbox: Callable[..., Sandbox],
                                                  skill_dir: Callable[..., Path],
                                                  tmp_path: Path) -> None:
    """WASI fds are wasmtime's table (0, 1, 2 only), not the process's: fds 3 and 4 are
    EBADF (8 each), and the answer is the module's own. Control: a Python skill writing the
    same bytes on fd 3 does corrupt its result frame."""
    python = Skill.from_dir(skill_dir(
        "import os\ndef run(input):\n    os.write(3, b'\\0\\0\\0\\5garbage')\n    return 1\n"))
    control = make_sandbox(python).execute(ExecutionRequest(skill_id=python.id))
    assert not control.ok and "invalid result frame" in control.error
    result = execute(make_sandbox, load(tmp_path, FORGE))
    assert result.ok, result.error
    assert result.json() == 16  # 8 + 8: EBADF twice


def test_key_value_store_is_bounded(make_sandbox: Callable[..., Sandbox],
                                    tmp_path: Path) -> None:
    """kv_set with ever new keys: refused (0) once the store holds memory_mb of data, so
    the host's heap cannot be grown past the module's own memory budget through it."""
    wat = """(module
      (import "env" "kv_set" (func $kv_set (param i32 i32 i32 i32) (result i32)))
      (import "env" "set_output" (func $set (param i32 i32)))
      (memory (export "memory") 2)
      (func (export "execute") (local $n i32)
        (block $full
          (loop $more
            (i32.store (i32.const 0) (local.get $n))
            (br_if $full (i32.eqz
              (call $kv_set (i32.const 0) (i32.const 4) (i32.const 0) (i32.const 65536))))
            (local.set $n (i32.add (local.get $n) (i32.const 1)))
            (br $more)))
        (i32.store8 (i32.const 99) (i32.const 34))
        (i32.store8 (i32.const 103) (i32.const 34))
        (i32.store8 (i32.const 100)
          (i32.add (i32.const 48) (i32.div_u (local.get $n) (i32.const 100))))
        (i32.store8 (i32.const 101) (i32.add (i32.const 48)
          (i32.rem_u (i32.div_u (local.get $n) (i32.const 10)) (i32.const 10))))
        (i32.store8 (i32.const 102)
          (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
        (call $set (i32.const 99) (i32.const 5))))"""
    skill = load(tmp_path, wat, '[limits]\nmemory_mb = 4\n[permissions]\nhost = ["kv:write"]\n')
    result = execute(make_sandbox, skill)
    assert result.ok, result.error
    assert 0 < int(result.json()) < 4 * 16  # 4 MiB of 64 KiB values
    assert "kv_set refused: the store would exceed" in result.stderr


WASM_SECCOMP_PROBE = """
import os, sys
from worker import seccomp
seccomp.Filter(seccomp.build_filter(True, profile=sys.argv[1])).install()
pid = os.fork()
if pid == 0:
    try:
        os.execv("/bin/true", ["/bin/true"])
    except OSError as exc:
        os._exit(100 + exc.errno)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


@requires("seccomp")
@pytest.mark.parametrize(("profile", "exit_code"), [("python", 0), ("wasm", 100 + 38)])
def test_wasm_seccomp_profile_cannot_exec_a_program(profile: str, exit_code: int) -> None:
    """Under the wasm profile (what a WASM skill's zygote and children run with), a process
    that got past wasmtime still cannot execve a program: ENOSYS (38). The python profile is
    the control: the same exec works."""
    done = subprocess.run([sys.executable, "-c", WASM_SECCOMP_PROBE, profile],
                          capture_output=True, timeout=30, cwd=ROOT, check=True)
    assert int(done.stdout) == exit_code, done.stderr


def test_wasm_skill_runs_under_every_layer_of_this_host(make_sandbox: Callable[..., Sandbox],
                                                        tmp_path: Path) -> None:
    """wasmtime works beneath the child's seccomp profile and Landlock ruleset (nothing it
    needs is refused): the echo answers, on a host where `doctor` reports those active."""
    skill = load(tmp_path, ECHO_REACTOR)
    sandbox = make_sandbox(skill, warm=True)
    report = {layer.name: layer.status for layer in sandbox.capabilities().layers}
    result = sandbox.execute(ExecutionRequest(skill_id=skill.id, input=json.dumps([1]).encode()))
    assert result.ok, (result.error, result.stderr, report)
    assert result.json() == [1]
