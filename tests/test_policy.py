"""Policy: per-tenant rules, files with errors naming file and field, and its place in execute."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandbox import (
    ExecutionRequest,
    ExecutionStatus,
    InMemoryCircuitBreaker,
    Policy,
    PolicyError,
    RateLimit,
    Sandbox,
    Skill,
    TenantPolicy,
)

ECHO = "import time\ndef run(input):\n    time.sleep(input.get('sleep', 0))\n    return input\n"
REJECTED = "runtime: policy rejected execution: "


@pytest.fixture
def skills(skill_dir: Callable[..., Path]) -> dict[str, Skill]:
    return {
        "echo": Skill.from_dir(skill_dir(ECHO, "[limits]\ntimeout = 5\n", skill_id="t/echo")),
        "admin": Skill.from_dir(skill_dir(ECHO, skill_id="admin/wipe")),
        "net": Skill.from_dir(skill_dir(ECHO, "[permissions]\nnetwork = true\n",
                                        skill_id="t/fetch")),
        "typed": Skill.from_dir(skill_dir(ECHO, '[input_schema]\ntype = "object"\n'
                                          'required = ["x"]\n', skill_id="t/typed")),
    }


def _request(skill: str, tenant: str = "acme", input_: bytes = b"{}",
             timeout: float | None = None) -> ExecutionRequest:
    return ExecutionRequest(skill_id=skill, tenant_id=tenant, input=input_, timeout=timeout)


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


# -- the built-in policy on its own ----------------------------------------------------------


def test_skill_globs_allow_and_deny(skills: dict[str, Skill]) -> None:
    policy = Policy(tenants={"acme": TenantPolicy(allowed_skills=["t/*"],
                                                  denied_skills=["t/fe*"])})
    assert policy.check(_request("t/echo"), skills["echo"]) is None
    assert policy.check(_request("admin/wipe"), skills["admin"]) == \
        "tenant 'acme' may not run skill 'admin/wipe'"
    assert policy.check(_request("t/fetch"), skills["net"]) == \
        "tenant 'acme' may not run skill 't/fetch'"


def test_unknown_tenants_use_default_or_are_refused(skills: dict[str, Skill]) -> None:
    open_policy = Policy(default=TenantPolicy(allowed_skills=["t/echo"]))
    assert open_policy.check(_request("t/echo", tenant="new"), skills["echo"]) is None
    closed = Policy(allow_unknown_tenants=False, tenants={"acme": TenantPolicy()})
    assert closed.check(_request("t/echo", tenant="new"), skills["echo"]) == \
        "tenant 'new' is not allowed to run skills"
    assert closed.check(_request("t/echo", tenant=""), skills["echo"]) == \
        "the anonymous tenant is not allowed to run skills"


def test_only_listed_tenants_may_run_network_skills(skills: dict[str, Skill]) -> None:
    policy = Policy(tenants={"trusted": TenantPolicy(network=True)})
    assert policy.check(_request("t/fetch", tenant="trusted"), skills["net"]) is None
    assert policy.check(_request("t/fetch", tenant="acme"), skills["net"]) == \
        "tenant 'acme' may not run skill 't/fetch', which uses the network"


def test_input_size_and_requested_timeout_caps(skills: dict[str, Skill]) -> None:
    policy = Policy(max_input_bytes=10, max_timeout=5,
                    tenants={"big": TenantPolicy(max_input_bytes=100, max_timeout=60)})
    assert policy.check(_request("t/echo", input_=b'{"a": "0123456789"}'), skills["echo"]) == \
        "the input is 19 bytes; tenant 'acme' may send at most 10"
    assert policy.check(_request("t/echo", timeout=6), skills["echo"]) == \
        "the requested timeout 6s is above tenant 'acme''s maximum of 5s"
    assert policy.check(_request("t/echo", tenant="big", input_=b'{"a": "0123456789"}',
                                 timeout=30), skills["echo"]) is None


def test_token_bucket_rate_limit_refills_with_time(skills: dict[str, Skill]) -> None:
    clock = FakeClock()
    policy = Policy(default=TenantPolicy(rate_limit=RateLimit(rate=2, burst=3)),
                    default_scope="per_tenant").with_clock(clock)
    echo = skills["echo"]
    outcomes = []
    for _ in range(4):
        outcomes.append(policy.check(_request("t/echo"), echo))
        policy.release(_request("t/echo"), echo)
    assert outcomes[:3] == [None, None, None]
    assert outcomes[3] == "tenant 'acme' is over its rate limit of 2/s (burst 3)"
    assert policy.check(_request("t/echo", tenant="other"), echo) is None  # per tenant
    clock.now += 0.5  # one token back
    assert policy.check(_request("t/echo"), echo) is None
    assert policy.check(_request("t/echo"), echo) is not None


def test_max_concurrent_counts_until_release(skills: dict[str, Skill]) -> None:
    policy = Policy(default=TenantPolicy(max_concurrent=2), default_scope="per_tenant")
    echo = skills["echo"]
    assert policy.check(_request("t/echo"), echo) is None
    assert policy.check(_request("t/echo"), echo) is None
    assert policy.check(_request("t/echo"), echo) == \
        "tenant 'acme' already has 2 executions running (max_concurrent = 2)"
    policy.release(_request("t/echo"), echo)
    assert policy.inflight("acme") == 1
    assert policy.check(_request("t/echo"), echo) is None


def test_concurrent_checks_never_exceed_max_concurrent(skills: dict[str, Skill]) -> None:
    policy = Policy(default=TenantPolicy(max_concurrent=5))
    barrier = threading.Barrier(40)
    admitted: list[bool] = []
    lock = threading.Lock()

    def check() -> None:
        barrier.wait(timeout=10)
        ok = policy.check(_request("t/echo"), skills["echo"]) is None
        with lock:
            admitted.append(ok)

    threads = [threading.Thread(target=check) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert admitted.count(True) == 5 and len(admitted) == 40


# -- files --------------------------------------------------------------------------------------

TOML_POLICY = """
max_input_bytes = 65536
max_timeout = 60

[default]
allowed_skills = ["t/*"]
max_concurrent = 4
rate_limit = { rate = 5, burst = 10 }

[tenants.acme]
allowed_skills = ["*"]
network = true
"""

YAML_POLICY = """
max_timeout: 30
allow_unknown_tenants: false
tenants:
  acme:
    allowed_skills: ["t/echo"]
    rate_limit: {rate: 1.5}
"""


def test_policy_files_in_toml_and_yaml(tmp_path: Path, skills: dict[str, Skill]) -> None:
    (tmp_path / "policy.toml").write_text(TOML_POLICY)
    (tmp_path / "policy.yaml").write_text(YAML_POLICY)
    from_toml = Policy.from_file(tmp_path / "policy.toml")
    assert from_toml.tenants["acme"].network is True
    assert from_toml.default.rate_limit == RateLimit(rate=5, burst=10)
    assert from_toml.check(_request("admin/wipe", tenant="other"), skills["admin"]) is not None
    from_yaml = Policy.from_file(tmp_path / "policy.yaml")
    assert from_yaml.max_timeout == 30
    assert from_yaml.tenants["acme"].rate_limit == RateLimit(rate=1.5, burst=1)
    assert from_yaml.check(_request("t/echo", tenant="other"), skills["echo"]) == \
        "tenant 'other' is not allowed to run skills"


@pytest.mark.parametrize(("name", "text", "message"), [
    ("p.toml", "[tenants.acme]\nmax_concurrent = 0\n",
     "p.toml: field 'tenants.acme.max_concurrent': Input should be greater than or equal to 1"),
    ("p.yaml", "tenants:\n  acme:\n    netwrk: true\n",
     "p.yaml: field 'tenants.acme.netwrk': unknown field"),
    ("p.toml", "[default]\nrate_limit = { burst = 2 }\n",
     "p.toml: field 'default.rate_limit.rate': Field required"),
    ("p.toml", "max_timeout = [", "p.toml: not valid TOML"),
    ("p.yml", "- just\n- a list\n", "p.yml: a policy must be a table/mapping, got list"),
    ("p.json", "{}", "unknown policy format '.json'"),
])
def test_bad_policy_files_name_the_file_and_field(tmp_path: Path, name: str, text: str,
                                                  message: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(PolicyError) as caught:
        Policy.from_file(tmp_path / name)
    assert message in str(caught.value)
    assert str(caught.value).startswith("runtime: invalid policy")


def test_missing_policy_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        Policy.from_file(tmp_path / "absent.toml")


# -- in Sandbox.execute ----------------------------------------------------------------------


def test_denial_is_rejected_with_the_seed_message_and_no_worker(
        make_sandbox: Callable[..., Sandbox], skills: dict[str, Skill]) -> None:
    policy = Policy(default=TenantPolicy(allowed_skills=["t/*"]))
    sandbox = make_sandbox(skills["echo"], skills["admin"], policy=policy)
    ran: list[str] = []
    original = sandbox._run

    def counting(loaded: Any, request: ExecutionRequest, *args: Any) -> Any:
        ran.append(request.skill_id)
        return original(loaded, request, *args)

    sandbox._run = counting  # type: ignore[method-assign,assignment]
    result = sandbox.execute(_request("admin/wipe"))
    assert result.status is ExecutionStatus.REJECTED
    assert result.error == REJECTED + "tenant 'acme' may not run skill 'admin/wipe'"
    assert ran == []
    assert sandbox.execute(_request("t/echo")).ok
    assert ran == ["t/echo"]


def test_admission_order_loaded_input_policy_breaker(
        make_sandbox: Callable[..., Sandbox], skills: dict[str, Skill]) -> None:
    deny_all = Policy(default=TenantPolicy(allowed_skills=[]))
    breaker = InMemoryCircuitBreaker(failure_threshold=1)
    breaker.record_failure("t/typed")
    sandbox = make_sandbox(skills["typed"], policy=deny_all, circuit_breaker=breaker)
    assert sandbox.execute(_request("x/none")).error == "runtime: skill not loaded"
    assert sandbox.execute(_request("t/typed")).error.startswith("runtime: invalid input")
    assert sandbox.execute(_request("t/typed", input_=b'{"x": 1}')).error.startswith(REJECTED)
    sandbox.policy = Policy()
    assert sandbox.execute(_request("t/typed", input_=b'{"x": 1}')).error == \
        "runtime: circuit breaker open"
    assert sandbox.policy.inflight("acme") == 0  # the breaker's refusal released the hold


def test_max_concurrent_is_released_after_each_execution(
        make_sandbox: Callable[..., Sandbox], skills: dict[str, Skill]) -> None:
    policy = Policy(default=TenantPolicy(max_concurrent=1), default_scope="per_tenant")
    sandbox = make_sandbox(skills["echo"], policy=policy, max_concurrency=2)
    started = threading.Event()
    results: list[Any] = []

    def slow() -> None:
        started.set()
        results.append(sandbox.execute(_request("t/echo", input_=b'{"sleep": 1}')))

    thread = threading.Thread(target=slow)
    thread.start()
    started.wait(timeout=5)
    second = None
    for _ in range(200):  # wait until the slow execution holds the tenant's slot
        if policy.inflight("acme") == 1:
            second = sandbox.execute(_request("t/echo"))
            break
        time.sleep(0.01)
    thread.join(timeout=10)
    assert second is not None
    assert second.error == REJECTED + \
        "tenant 'acme' already has 1 executions running (max_concurrent = 1)"
    assert results[0].ok
    assert policy.inflight("acme") == 0
    assert sandbox.execute(_request("t/echo")).ok


def test_custom_policy_object(make_sandbox: Callable[..., Sandbox],
                              skills: dict[str, Skill]) -> None:
    class BusinessHours:
        def check(self, request: ExecutionRequest, skill: Skill) -> str | None:
            return "closed on weekends" if request.user_id == "weekend" else None

    class Broken:
        def check(self, request: ExecutionRequest, skill: Skill) -> str | None:
            raise RuntimeError("policy store down")

    sandbox = make_sandbox(skills["echo"], policy=BusinessHours())
    assert sandbox.execute(ExecutionRequest(skill_id="t/echo", user_id="weekday")).ok
    assert sandbox.execute(ExecutionRequest(skill_id="t/echo", user_id="weekend")).error == \
        REJECTED + "closed on weekends"
    sandbox.policy = Broken()
    result = sandbox.execute(ExecutionRequest(skill_id="t/echo"))
    assert result.status is ExecutionStatus.REJECTED
    assert result.error == REJECTED + "the policy check raised RuntimeError: policy store down"


def test_shared_default_is_one_limit_for_every_unlisted_tenant(
        skills: dict[str, Skill]) -> None:
    clock = FakeClock()
    policy = Policy(default=TenantPolicy(rate_limit=RateLimit(rate=1, burst=2),
                                         max_concurrent=3),
                    tenants={"acme": TenantPolicy(rate_limit=RateLimit(rate=1, burst=1))}
                    ).with_clock(clock)
    echo = skills["echo"]
    outcomes = [policy.check(_request("t/echo", tenant=f"fresh-{n}"), echo) for n in range(5)]
    assert outcomes[:2] == [None, None]
    assert outcomes[2] == ("tenant 'fresh-2' is over the unlisted tenants' shared [default] "
                           "rate limit of 1/s (burst 2)")
    assert policy.inflight("anyone-else") == 2  # one shared count
    assert policy.check(_request("t/echo", tenant="acme"), echo) is None  # its own bucket
    clock.now += 10
    assert policy.check(_request("t/echo", tenant="x"), echo) is None
    assert policy.check(_request("t/echo", tenant="y"), echo) is not None  # max_concurrent 3
    assert "shared [default] max_concurrent = 3" in str(
        policy.check(_request("t/echo", tenant="y"), echo))


def test_idle_tenant_state_is_dropped_once_its_bucket_refills(
        skills: dict[str, Skill]) -> None:
    clock = FakeClock()
    policy = Policy(default=TenantPolicy(rate_limit=RateLimit(rate=2, burst=2)),
                    default_scope="per_tenant").with_clock(clock)
    echo = skills["echo"]
    for n in range(100):
        request = _request("t/echo", tenant=f"t-{n}")
        assert policy.check(request, echo) is None
        policy.release(request, echo)
    assert policy.tracked_tenants() == 100
    clock.now += 0.25  # half a token back: not yet like a fresh bucket
    assert policy.tracked_tenants() == 100
    clock.now += 0.25
    assert policy.tracked_tenants() == 0
    request = _request("t/echo", tenant="t-1")  # a dropped tenant starts full, as before
    assert [policy.check(request, echo) for _ in range(3)][:2] == [None, None]
