"""Daemon configuration: defaults < file < environment < flags, and errors that say where."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox.daemon.config import (
    CONFIG_KEYS,
    ConfigError,
    DaemonConfig,
    LimitsDefaults,
    env_values,
    load_config,
    parse_tcp,
)
from sandbox.daemon.skills import discover, with_defaults
from sandbox.skill import Skill

TOKEN = "0123456789abcdef0123"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "daemon.toml"
    path.write_text(text)
    return path


def test_file_then_env_then_flags_win(tmp_path: Path) -> None:
    path = _write(tmp_path, "max_queue = 1\ngrace_period = 5\nlog_level = 'debug'\n"
                            "[limits]\ntimeout = 7\n")
    config = load_config(path, env={"SKILL_SANDBOX_MAX_QUEUE": "2",
                                    "SKILL_SANDBOX_GRACE_PERIOD": "6"},
                         flags={"max_queue": "3"})
    assert config.max_queue == 3  # flag over env over file
    assert config.grace_period == 6.0  # env over file
    assert config.log_level == "debug"  # file over default
    assert config.limits.timeout == 7.0
    assert config.max_body_bytes == DaemonConfig().max_body_bytes  # default


def test_every_key_has_an_env_variable_and_a_flag() -> None:
    names = {key.name for key in CONFIG_KEYS}
    assert {"skills", "socket", "tcp", "token_file", "max_concurrency", "policy",
            "execution_log", "limits.timeout", "limits.memory_mb", "circuit.cooldown"} <= names
    for key in CONFIG_KEYS:
        assert key.env == "SKILL_SANDBOX_" + key.name.replace(".", "_").upper()
        assert key.flag == "--" + key.name.replace(".", "-").replace("_", "-")
    config = load_config(None, env={"SKILL_SANDBOX_LIMITS_MEMORY_MB": "64",
                                    "SKILL_SANDBOX_SKILLS": "/a:/b",
                                    "SKILL_SANDBOX_TOOLS": "web.search=http://tools:8080",
                                    "SKILL_SANDBOX_NOTIFY": "false"})
    assert config.limits.memory_mb == 64
    assert config.skills == [Path("/a"), Path("/b")]
    assert config.tools == {"web.search": "http://tools:8080"}
    assert config.notify is False


def test_file_errors_name_the_file_and_the_field(tmp_path: Path) -> None:
    path = _write(tmp_path, "max_concurrency = 0\ntypo_key = 1\n[limits]\ncpu_time = 'lots'\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path, env={})
    text = str(raised.value)
    assert f"{path}: field 'max_concurrency': Input should be greater than 0" in text
    assert f"{path}: field 'typo_key': unknown key" in text
    assert f"{path}: field 'limits.cpu_time'" in text


def test_env_and_flag_errors_name_the_variable_and_the_flag() -> None:
    with pytest.raises(ConfigError, match="environment variable SKILL_SANDBOX_MAX_QUEUE "
                                          r"\(field 'max_queue'\)"):
        load_config(None, env={"SKILL_SANDBOX_MAX_QUEUE": "many"})
    with pytest.raises(ConfigError, match=r"flag --grace-period \(field 'grace_period'\)"):
        load_config(None, env={}, flags={"grace_period": "-1"})


def test_unreadable_or_invalid_toml_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml", env={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "max_queue = = 1"), env={})


def test_relative_paths_in_a_file_are_relative_to_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "skills = ['skills', '/abs']\nsocket = 'run/d.sock'\n")
    config = load_config(path, env={})
    assert config.skills == [tmp_path / "skills", Path("/abs")]
    assert config.socket == tmp_path / "run" / "d.sock"


def test_tcp_requires_a_token_and_tokens_must_be_strong(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="refusing to listen on TCP without a bearer token"):
        load_config(None, env={"SKILL_SANDBOX_TCP": "127.0.0.1:8700"})
    with pytest.raises(ConfigError, match="at least 16 characters"):
        load_config(None, env={}, flags={"tcp": "127.0.0.1:8700", "token": "short"})
    with pytest.raises(ConfigError, match="cannot read token file"):
        load_config(None, env={}, flags={"tcp": "127.0.0.1:1", "token_file": "/nonexistent"})
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    config = load_config(None, env={}, flags={"tcp": "[::1]:8700",
                                              "token_file": str(token_file)})
    assert config.bearer_token() == TOKEN
    assert config.tcp_address is not None and config.tcp_address.port == 8700
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, env={}, flags={"token": TOKEN, "token_file": str(token_file)})


@pytest.mark.parametrize("value", ["8700", "host:80", "127.0.0.1:99999", "127.0.0.1:x", ":80"])
def test_bad_tcp_addresses_are_refused(value: str) -> None:
    with pytest.raises(ValueError):
        parse_tcp(value)


def test_unknown_prefixed_variables_are_reported_as_likely_typos() -> None:
    _, unknown = env_values({"SKILL_SANDBOX_MAX_CONCURENCY": "4", "SKILL_SANDBOX_URL": "x",
                             "SKILL_SANDBOX_CONFIG": "y", "PATH": "/bin"})
    assert unknown == ["SKILL_SANDBOX_MAX_CONCURENCY"]


def test_default_limits_fill_what_a_manifest_leaves_unset(tmp_path: Path) -> None:
    skill_dir = tmp_path / "s"
    skill_dir.mkdir()
    (skill_dir / "main.py").write_text("def run(input):\n    return input\n")
    (skill_dir / "skill.toml").write_text('id = "t/s"\nentrypoint = "main:run"\n'
                                          "[limits]\ntimeout = 3\n")
    skill = with_defaults(Skill.from_dir(skill_dir),
                          LimitsDefaults(timeout=60, memory_mb=256, cpu_time=None))
    assert skill.manifest.limits.timeout == 3.0  # the manifest's own value wins
    assert skill.manifest.limits.memory_mb == 256  # the daemon's default fills the gap
    assert skill.manifest.limits.cpu_time == 5.0  # neither: the library default
    assert skill.input_problem(b"{}") is None


def test_discovery_reports_each_broken_skill_and_loads_the_rest(tmp_path: Path) -> None:
    for name, manifest in (("good", 'id = "t/good"\nentrypoint = "main:run"\n'),
                           ("bad", 'id = "T G"\nentrypoint = "main:run"\n'),
                           ("dupe", 'id = "t/good"\nentrypoint = "main:run"\n')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "main.py").write_text("def run(input):\n    return 1\n")
        (tmp_path / name / "skill.toml").write_text(manifest)
    found = discover([tmp_path, tmp_path / "absent"], LimitsDefaults())
    assert list(found.skills) == ["t/good"]
    assert found.broken == {(tmp_path / "bad").resolve()}
    assert any("field 'id'" in error and "bad" in error for error in found.errors)
    assert any("is also the id of" in error for error in found.errors)
    assert any("absent: skills directory does not exist" in error for error in found.errors)


def test_isolation_settings_are_checked_and_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"flag --isolation-disabled .*unknown mechanism\(s\) "
                                          "magic"):
        load_config(None, env={}, flags={"isolation.disabled": ["magic"]})
    path = _write(tmp_path, "[isolation]\ndisabled = ['netns']\nrequired = ['netns']\n")
    with pytest.raises(ConfigError, match="both required and disabled"):
        load_config(path, env={})
    config = load_config(None, env={"SKILL_SANDBOX_ISOLATION_DISABLED": "netns:cgroups",
                                    "SKILL_SANDBOX_ISOLATION_WORKDIR_MB": "32"})
    isolation = config.isolation.to_config()
    assert isolation.disabled == frozenset({"netns", "cgroups"})
    assert isolation.workdir_mb == 32
