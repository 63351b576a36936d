"""Skill Sandbox: run untrusted skills in isolated, resource-limited worker processes.

    from sandbox import ExecutionRequest, Sandbox, Skill

    with Sandbox([Skill.from_dir("skills_examples/echo")]) as sandbox:
        result = sandbox.execute(ExecutionRequest(skill_id="examples/echo", input=b'{"x": 1}'))
        print(result.status, result.output, result.resource_usage)

Importing the package loads none of its parts: each public name is imported from its module the
first time it is used (PEP 562 `__getattr__`), so `import sandbox` stays cheap and a program that
only runs skills never loads the daemon's or the client's dependencies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sandbox.capabilities import (
        CapabilityReport,
        IsolationConfig,
        IsolationUnavailable,
    )
    from sandbox.circuit import (
        CircuitBreaker,
        CircuitState,
        InMemoryCircuitBreaker,
    )
    from sandbox.client import (
        AsyncSandboxClient,
        SandboxClient,
    )
    from sandbox.errors import (
        BadRequest,
        CircuitOpen,
        DaemonBusy,
        DaemonError,
        DaemonUnavailable,
        ExecutionCanceled,
        ExecutionError,
        ExecutionTimeout,
        InvalidConfiguration,
        InvalidInput,
        InvalidPlan,
        PlanFailed,
        PolicyError,
        PolicyRejected,
        Rejected,
        ResourceExhausted,
        SandboxError,
        SkillFailed,
        SkillLoadError,
        SkillNotLoaded,
        ToolError,
        ToolTimeout,
        Unauthorized,
        WorkerFailure,
    )
    from sandbox.execlog import (
        ExecutionLogger,
        ExecutionLogRecord,
        JsonlExecutionLogger,
        LoggingExecutionLogger,
        MultiExecutionLogger,
        SqliteExecutionLogger,
    )
    from sandbox.llm import (
        CallableProvider,
        Generation,
        LLMError,
        LLMProvider,
        LLMTimeout,
        OpenAICompatibleProvider,
    )
    from sandbox.manifest import (
        LimitsConfig,
        Permissions,
        SkillManifest,
    )
    from sandbox.plans import (
        ExecutionContext,
        ExecutionPlan,
        ExecutionStep,
        StepResult,
        StepType,
    )
    from sandbox.policy import (
        ExecutionPolicy,
        Policy,
        RateLimit,
        TenantPolicy,
    )
    from sandbox.sandbox import Sandbox
    from sandbox.skill import Skill
    from sandbox.tools import (
        HttpToolRunner,
        ToolContext,
        ToolRunner,
    )
    from worker.protocol import (
        ErrorKind,
        ExecutionRequest,
        ExecutionResult,
        ExecutionStatus,
        ResourceUsage,
    )
    from worker.runtime import SkillContext

#: Each public name and the module that defines it.
_EXPORTS: dict[str, str] = {
    "AsyncSandboxClient": "sandbox.client",
    "BadRequest": "sandbox.errors",
    "CallableProvider": "sandbox.llm",
    "CapabilityReport": "sandbox.capabilities",
    "CircuitBreaker": "sandbox.circuit",
    "CircuitOpen": "sandbox.errors",
    "CircuitState": "sandbox.circuit",
    "DaemonBusy": "sandbox.errors",
    "DaemonError": "sandbox.errors",
    "DaemonUnavailable": "sandbox.errors",
    "ErrorKind": "worker.protocol",
    "ExecutionCanceled": "sandbox.errors",
    "ExecutionContext": "sandbox.plans",
    "ExecutionError": "sandbox.errors",
    "ExecutionLogRecord": "sandbox.execlog",
    "ExecutionLogger": "sandbox.execlog",
    "ExecutionPlan": "sandbox.plans",
    "ExecutionPolicy": "sandbox.policy",
    "ExecutionRequest": "worker.protocol",
    "ExecutionResult": "worker.protocol",
    "ExecutionStatus": "worker.protocol",
    "ExecutionStep": "sandbox.plans",
    "ExecutionTimeout": "sandbox.errors",
    "Generation": "sandbox.llm",
    "HttpToolRunner": "sandbox.tools",
    "InMemoryCircuitBreaker": "sandbox.circuit",
    "InvalidConfiguration": "sandbox.errors",
    "InvalidInput": "sandbox.errors",
    "InvalidPlan": "sandbox.errors",
    "IsolationConfig": "sandbox.capabilities",
    "IsolationUnavailable": "sandbox.capabilities",
    "JsonlExecutionLogger": "sandbox.execlog",
    "LLMError": "sandbox.llm",
    "LLMProvider": "sandbox.llm",
    "LLMTimeout": "sandbox.llm",
    "LimitsConfig": "sandbox.manifest",
    "LoggingExecutionLogger": "sandbox.execlog",
    "MultiExecutionLogger": "sandbox.execlog",
    "OpenAICompatibleProvider": "sandbox.llm",
    "Permissions": "sandbox.manifest",
    "PlanFailed": "sandbox.errors",
    "Policy": "sandbox.policy",
    "PolicyError": "sandbox.errors",
    "PolicyRejected": "sandbox.errors",
    "RateLimit": "sandbox.policy",
    "Rejected": "sandbox.errors",
    "ResourceExhausted": "sandbox.errors",
    "ResourceUsage": "worker.protocol",
    "Sandbox": "sandbox.sandbox",
    "SandboxClient": "sandbox.client",
    "SandboxError": "sandbox.errors",
    "Skill": "sandbox.skill",
    "SkillContext": "worker.runtime",
    "SkillFailed": "sandbox.errors",
    "SkillLoadError": "sandbox.errors",
    "SkillManifest": "sandbox.manifest",
    "SkillNotLoaded": "sandbox.errors",
    "SqliteExecutionLogger": "sandbox.execlog",
    "StepResult": "sandbox.plans",
    "StepType": "sandbox.plans",
    "TenantPolicy": "sandbox.policy",
    "ToolContext": "sandbox.tools",
    "ToolError": "sandbox.errors",
    "ToolRunner": "sandbox.tools",
    "ToolTimeout": "sandbox.errors",
    "Unauthorized": "sandbox.errors",
    "WorkerFailure": "sandbox.errors",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sandbox' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "AsyncSandboxClient",
    "BadRequest",
    "CallableProvider",
    "CapabilityReport",
    "CircuitBreaker",
    "CircuitOpen",
    "CircuitState",
    "DaemonBusy",
    "DaemonError",
    "DaemonUnavailable",
    "ErrorKind",
    "ExecutionCanceled",
    "ExecutionContext",
    "ExecutionError",
    "ExecutionLogRecord",
    "ExecutionLogger",
    "ExecutionPlan",
    "ExecutionPolicy",
    "ExecutionRequest",
    "ExecutionResult",
    "ExecutionStatus",
    "ExecutionStep",
    "ExecutionTimeout",
    "Generation",
    "HttpToolRunner",
    "InMemoryCircuitBreaker",
    "InvalidConfiguration",
    "InvalidInput",
    "InvalidPlan",
    "IsolationConfig",
    "IsolationUnavailable",
    "JsonlExecutionLogger",
    "LLMError",
    "LLMProvider",
    "LLMTimeout",
    "LimitsConfig",
    "LoggingExecutionLogger",
    "MultiExecutionLogger",
    "OpenAICompatibleProvider",
    "Permissions",
    "PlanFailed",
    "Policy",
    "PolicyError",
    "PolicyRejected",
    "RateLimit",
    "Rejected",
    "ResourceExhausted",
    "ResourceUsage",
    "Sandbox",
    "SandboxClient",
    "SandboxError",
    "Skill",
    "SkillContext",
    "SkillFailed",
    "SkillLoadError",
    "SkillManifest",
    "SkillNotLoaded",
    "SqliteExecutionLogger",
    "StepResult",
    "StepType",
    "TenantPolicy",
    "ToolContext",
    "ToolError",
    "ToolRunner",
    "ToolTimeout",
    "Unauthorized",
    "WorkerFailure",
]
