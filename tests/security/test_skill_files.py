"""Hostile skill directories: files the skill's author links out of the directory, or makes
huge, so that a trusted process — the zygote, which compiles the entrypoint as root *before*
its layers, or the supervisor, which reads the manifest — reads them on the skill's behalf.

Each test has a control: the same bytes placed *inside* the skill directory do reach the caller
(a module `password = <token>` fails with `NameError: name '<token>' is not defined`), so the
channel is real and its absence on the attack is the layer's doing.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from sandbox import ExecutionRequest, Sandbox, Skill, SkillLoadError

MANIFEST = 'id = "{id}"\nversion = "0.1.0"\nentrypoint = "main:run"\n'
READER = '''
def run(input):
    try:
        with open(input["path"], "rb") as secret:
            return {"read": secret.read().decode()}
    except OSError as exc:
        return {"refused": type(exc).__name__}
'''


def _token() -> str:
    return f"rootonly{uuid.uuid4().hex}"


def _root_only_module(tmp_path: Path, token: str) -> Path:
    """A file only the supervisor's user can read (0600 in a 0700 directory), shaped like an
    env file whose value would be echoed back by the Python compiler or interpreter."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    secret = private / "settings.py"
    secret.write_text(f"password = {token}\n")
    secret.chmod(0o600)
    return secret


def _skill(tmp_path: Path, name: str, main: str | None = None) -> Path:
    directory = tmp_path / name
    directory.mkdir(mode=0o755)
    (directory / "skill.toml").write_text(MANIFEST.format(id=f"test/{name}"))
    if main is not None:
        (directory / "main.py").write_text(main)
    return directory


def _swap_in_after_load_and_run(make_sandbox: Callable[..., Sandbox], directory: Path,
                                name: str, secret: Path, token: str) -> None:
    """Load the skill (its zygote starts lazily), replace `name` by a symlink to `secret`,
    run it: the execution fails and nothing of the secret reaches the answer."""
    skill = Skill.from_dir(directory)
    sandbox = make_sandbox(skill)
    (directory / name).unlink()
    (directory / name).symlink_to(secret)
    status, answer = _run(sandbox, skill.id)
    assert token not in answer, (status, answer)
    assert status == "failed", (status, answer)


def _run(sandbox: Sandbox, skill_id: str, payload: bytes = b"{}") -> tuple[str, str]:
    result = sandbox.execute(ExecutionRequest(skill_id=skill_id, input=payload))
    return str(result.status), (result.error or "") + (result.output or b"").decode()


def _controls(make_sandbox: Callable[..., Sandbox], tmp_path: Path, secret: Path,
              token: str) -> None:
    """The execution itself cannot read the file; the same text inside a skill does leak."""
    reader = Skill.from_dir(_skill(tmp_path, "reader", READER))
    echoed = Skill.from_dir(_skill(tmp_path, "inside", f"password = {token}\n"))
    sandbox = make_sandbox(reader, echoed)
    _, answer = _run(sandbox, reader.id, f'{{"path": "{secret}"}}'.encode())
    assert "refused" in answer and token not in answer, answer
    _, answer = _run(sandbox, echoed.id)
    assert token in answer, answer  # the channel works: the name is echoed back


def test_an_entrypoint_symlinked_out_of_the_skill_is_refused_at_load(
        make_sandbox: Callable[..., Sandbox], tmp_path: Path) -> None:
    token = _token()
    secret = _root_only_module(tmp_path, token)
    _controls(make_sandbox, tmp_path, secret, token)
    directory = _skill(tmp_path, "linked")
    (directory / "main.py").symlink_to(secret)
    try:
        skill = Skill.from_dir(directory)
    except SkillLoadError as refused:
        assert "entrypoint" in str(refused) and token not in str(refused), refused
        return
    status, answer = _run(make_sandbox(skill), skill.id)
    assert token not in answer, (status, answer)
    pytest.fail(f"a module outside the skill directory loaded: {status} {answer}")


def test_an_entrypoint_swapped_for_a_symlink_after_load_is_never_read_by_the_zygote(
        make_sandbox: Callable[..., Sandbox], tmp_path: Path) -> None:
    """Zygotes start lazily: the author swaps main.py between load and the first execution,
    so only the zygote's own check can stand."""
    token = _token()
    secret = _root_only_module(tmp_path, token)
    _controls(make_sandbox, tmp_path, secret, token)
    directory = _skill(tmp_path, "swapped", "def run(input):\n    return 'fine'\n")
    _swap_in_after_load_and_run(make_sandbox, directory, "main.py", secret, token)


def test_a_swapped_directory_component_does_not_lead_the_zygote_out(
        make_sandbox: Callable[..., Sandbox], tmp_path: Path) -> None:
    """The entrypoint's path, not only its last component: a package-less `main.py` reached
    through a directory the author replaces with a symlink after load."""
    token = _token()
    secret = _root_only_module(tmp_path, token)
    _controls(make_sandbox, tmp_path, secret, token)
    outer = tmp_path / "outer"
    outer.mkdir(mode=0o755)
    directory = outer / "skill"
    directory.mkdir(mode=0o755)
    (directory / "skill.toml").write_text(MANIFEST.format(id="test/component"))
    (directory / "main.py").write_text("def run(input):\n    return 'fine'\n")
    skill = Skill.from_dir(directory)
    sandbox = make_sandbox(skill)
    os.rename(directory, outer / "moved")
    decoy = tmp_path / "decoy"  # world-readable, as a skill directory must be
    decoy.mkdir(mode=0o755)
    os.symlink(secret, decoy / "main.py")
    directory.symlink_to(decoy)  # the skill's path now leads elsewhere
    status, answer = _run(sandbox, skill.id)
    assert token not in answer, (status, answer)


# -- what the zygote compiles: bounded in memory -------------------------------------------


def _leb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _section(number: int, body: bytes) -> bytes:
    return bytes([number]) + _leb(len(body)) + body


def _data_segment_module(data_bytes: int) -> bytes:
    """A WASI command (`_start` does nothing) whose one active data segment is `data_bytes`
    long, with a linear memory just big enough for it: a few hundred bytes of structure, and
    compiling it costs about four times the segment in memory."""
    payload = _leb(1) + b"\x00\x41\x00\x0b" + _leb(data_bytes)  # memory 0, offset i32.const 0
    return (b"\0asm\x01\0\0\0"
            + _section(1, _leb(1) + b"\x60\x00\x00")  # type: [] -> []
            + _section(3, _leb(1) + b"\x00")  # one function of that type
            + _section(5, _leb(1) + b"\x00" + _leb(data_bytes // 65536 + 1))
            + _section(7, _leb(1) + _leb(6) + b"_start\x00" + _leb(0))
            + _section(10, _leb(1) + _leb(2) + b"\x00\x0b")
            + bytes([11]) + _leb(len(payload) + data_bytes) + payload + b"\x01" * data_bytes)


_PEAK = '''
import sys, wasmtime
config = wasmtime.Config()
config.consume_fuel = True
config.parallel_compilation = False
wasmtime.Module.from_file(wasmtime.Engine(config), sys.argv[1])
with open("/proc/self/status") as status:
    print(next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) * 1024)
'''


def test_a_wasm_compile_bomb_cannot_take_the_zygote_past_its_compile_budget(
        make_sandbox: Callable[..., Sandbox], tmp_path: Path) -> None:
    """The zygote compiles the module as the supervisor's user, in no cgroup, before any
    limit: a module file of a few hundred MB (or one that stays small and compiles large)
    would take the host's memory. RLIMIT_DATA bounds the compile; the skill fails as its own."""
    pytest.importorskip("wasmtime")
    import subprocess
    import sys

    from sandbox import ErrorKind
    from worker.isolation import COMPILE_MEMORY_MB

    budget = COMPILE_MEMORY_MB << 20
    directory = tmp_path / "bomb"
    directory.mkdir(mode=0o755)
    module = directory / "main.wasm"
    module.write_bytes(_data_segment_module(budget * 3 // 8))
    (directory / "skill.toml").write_text(
        'id = "test/bomb"\nwasm = "main.wasm"\n[limits]\nmemory_mb = 1024\ntimeout = 60\n')
    # Control: compiled without the cap (a plain interpreter), it peaks past the budget.
    peak = subprocess.run([sys.executable, "-c", _PEAK, str(module)], capture_output=True,
                          timeout=120, check=True)
    assert int(peak.stdout) > budget, peak
    skill = Skill.from_dir(directory)
    sandbox = make_sandbox(skill)
    result = sandbox.execute(ExecutionRequest(skill_id=skill.id, input=b"{}"))
    assert not result.ok, result
    assert result.error_kind == ErrorKind.SKILL_FAILED, result
    assert f"{COMPILE_MEMORY_MB} MiB" in (result.error or ""), result
    assert not sandbox.zygote_info(skill.id, start=False)["alive"]


# -- manifests: read by the supervisor (and the daemon's watcher, whose errors /v1/skills shows)

#: Per manifest file: text whose token a loader would echo back — in an error ("field '...':
#: unknown field"), in the loaded manifest (openbotstack keeps unknown keys as metadata; the
#: SKILL.md body is a declarative skill's prompt, sent to the LLM provider).
_MANIFEST_BAIT = {
    "skill.toml": 'id = "test/bait"\nversion = "0.1.0"\nentrypoint = "main:run"\n{token} = 1\n',
    "manifest.yaml": "name: bait\nversion: 0.1.0\n{token}: 1\n",
    "SKILL.md": "---\nname: bait\n---\nSummarize {token}\n",
}


def _exposed(directory: Path) -> str:
    """Everything loading `directory` tells its caller: the error, or the loaded manifest."""
    try:
        return repr(Skill.from_dir(directory).manifest)
    except SkillLoadError as refused:
        return str(refused)


def _manifest_skill(tmp_path: Path, name: str) -> Path:
    directory = tmp_path / name
    directory.mkdir(mode=0o755)
    (directory / "main.py").write_text("def run(input):\n    return {}\n")
    return directory


@pytest.mark.parametrize("manifest", sorted(_MANIFEST_BAIT))
def test_a_manifest_symlinked_out_of_the_skill_is_never_read(tmp_path: Path,
                                                             manifest: str) -> None:
    token = _token()
    text = _MANIFEST_BAIT[manifest].format(token=token)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    secret = private / "config"
    secret.write_text(text)
    secret.chmod(0o600)
    # Control: the same text inside the skill's directory reaches whoever loads it.
    inside = _manifest_skill(tmp_path, "inside")
    (inside / manifest).write_text(text)
    assert token in _exposed(inside)
    linked = _manifest_skill(tmp_path, "linked")
    (linked / manifest).symlink_to(secret)
    exposed = _exposed(linked)
    assert token not in exposed, exposed
    assert "outside the skill's directory" in exposed, exposed


_LOAD_UNDER_CAP = '''
import resource, sys
resource.setrlimit(resource.RLIMIT_DATA, (384 << 20, resource.RLIM_INFINITY))
from sandbox import Skill, SkillLoadError
try:
    {load}
except SkillLoadError as refused:
    print("refused:", refused)
'''


@pytest.mark.parametrize("manifest", sorted(_MANIFEST_BAIT))
def test_a_manifest_of_a_gigabyte_is_refused_before_it_is_read(tmp_path: Path,
                                                              manifest: str) -> None:
    import subprocess
    import sys

    directory = _manifest_skill(tmp_path, "huge")
    path = directory / manifest
    with path.open("wb") as sparse:  # a gigabyte that costs no disk
        sparse.write(_MANIFEST_BAIT[manifest].format(token="x").encode())
        sparse.truncate(1 << 30)

    def load(statement: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", _LOAD_UNDER_CAP.format(load=statement)],
                              capture_output=True, text=True, timeout=120)

    # Control: reading it whole does not fit the 384 MiB the loader gets here.
    whole = load(f"open({str(path)!r}, 'rb').read().decode()")
    assert "MemoryError" in whole.stderr, whole
    loaded = load(f"Skill.from_dir({str(directory)!r})")
    assert loaded.returncode == 0 and "refused:" in loaded.stdout, loaded
    assert "bytes" in loaded.stdout and "larger" in loaded.stdout, loaded.stdout


_SECRET_MODULE = """
(module
  (import "env" "set_output" (func $set (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "\\"{token}\\"")
  (func (export "execute") (call $set (i32.const 0) (i32.const {length}))))
"""


def test_a_wasm_module_swapped_for_a_symlink_after_load_is_never_read_by_the_zygote(
        make_sandbox: Callable[..., Sandbox], tmp_path: Path) -> None:
    """The zygote reads main.wasm as root before its layers; load checked the path, but the
    zygote boots later (lazily): a private module of the host's must not run as the skill."""
    wasmtime = pytest.importorskip("wasmtime")
    token = _token()
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    secret = private / "operator.wasm"
    secret.write_bytes(wasmtime.wat2wasm(_SECRET_MODULE.format(token=token,
                                                               length=len(token) + 2)))
    secret.chmod(0o600)
    # Controls: the execution cannot read the file; as the skill's own module it answers.
    reader = Skill.from_dir(_skill(tmp_path, "reader", READER))
    _, answer = _run(make_sandbox(reader), reader.id, f'{{"path": "{secret}"}}'.encode())
    assert "refused" in answer and token not in answer, answer

    def wasm_skill(name: str) -> Path:
        directory = tmp_path / name
        directory.mkdir(mode=0o755)
        (directory / "main.wasm").write_bytes(secret.read_bytes())
        (directory / "skill.toml").write_text(f'id = "test/{name}"\nwasm = "main.wasm"\n')
        return directory

    own = Skill.from_dir(wasm_skill("own"))
    _, answer = _run(make_sandbox(own), own.id)
    assert token in answer, answer
    _swap_in_after_load_and_run(make_sandbox, wasm_skill("swapped"), "main.wasm", secret, token)


def _locals_bomb(functions: int) -> bytes:
    """`functions` functions each declaring 50,000 locals (the validator's cap) in three bytes:
    about 10 bytes of module per function, some 5 ms of compiling CPU each here."""
    body = _leb(1) + _leb(50_000) + b"\x7f" + b"\x20" + _leb(49_999) + b"\x1a\x0b"
    return (b"\0asm\x01\0\0\0"
            + _section(1, _leb(1) + b"\x60\x00\x00")
            + _section(3, _leb(functions) + b"\x00" * functions)
            + _section(5, _leb(1) + b"\x00\x01")
            + _section(7, _leb(2) + _leb(6) + b"_start\x00" + _leb(0)
                       + _leb(6) + b"memory\x02" + _leb(0))
            + _section(10, _leb(functions) + (_leb(len(body)) + body) * functions))


_CPU = '''
import resource, sys, wasmtime
config = wasmtime.Config()
config.consume_fuel = True
config.parallel_compilation = False
engine = wasmtime.Engine(config)
before = resource.getrusage(resource.RUSAGE_SELF).ru_utime
wasmtime.Module.from_file(engine, sys.argv[1])
print(resource.getrusage(resource.RUSAGE_SELF).ru_utime - before)
'''


@pytest.mark.timeout(300)
def test_a_small_wasm_module_that_compiles_for_ever_is_stopped_as_the_skill_s_own_failure(
        make_sandbox: Callable[..., Sandbox], tmp_path: Path) -> None:
    """A few tens of KB that take minutes of CPU to compile, as root and in no cgroup, at
    every cold start, and — a boot that merely times out being the sandbox's failure, which
    the circuit breaker ignores — at every request. The zygote compiles under RLIMIT_CPU; the
    skill fails as its own, so its circuit opens."""
    pytest.importorskip("wasmtime")
    import subprocess
    import sys

    from sandbox import ErrorKind
    from worker.isolation import COMPILE_CPU_SECONDS

    functions = 3000 * COMPILE_CPU_SECONDS // 5  # some 3 x the budget here
    directory = tmp_path / "slow"
    directory.mkdir(mode=0o755)
    (directory / "main.wasm").write_bytes(_locals_bomb(functions))
    (directory / "skill.toml").write_text('id = "test/slow"\nwasm = "main.wasm"\n')
    # Control: a tenth of it, compiled by a plain interpreter, costs CPU in proportion, so the
    # whole module would cost more than the budget (compile cost is linear in functions).
    part = tmp_path / "part.wasm"
    part.write_bytes(_locals_bomb(functions // 10))
    spent = subprocess.run([sys.executable, "-c", _CPU, str(part)], capture_output=True,
                           text=True, timeout=120, check=True)
    assert float(spent.stdout) * 10 > COMPILE_CPU_SECONDS, spent.stdout
    skill = Skill.from_dir(directory)
    sandbox = make_sandbox(skill, zygote_start_timeout=240.0)
    result = sandbox.execute(ExecutionRequest(skill_id=skill.id, input=b"{}"))
    assert result.error_kind == ErrorKind.SKILL_FAILED, result
    assert "CPU" in (result.error or ""), result
