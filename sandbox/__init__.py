"""Skill Sandbox: run untrusted skills in isolated, resource-limited worker processes.

    from sandbox import ExecutionRequest, Sandbox, Skill

    with Sandbox([Skill.from_dir("skills_examples/echo")]) as sandbox:
        result = sandbox.execute(ExecutionRequest(skill_id="examples/echo", input=b'{"x": 1}'))
        print(result.status, result.output, result.resource_usage)
"""

from sandbox.capabilities import CapabilityReport, IsolationConfig, IsolationUnavailable
from sandbox.circuit import CircuitBreaker, CircuitState, InMemoryCircuitBreaker
from sandbox.client import AsyncSandboxClient, DaemonError, DaemonUnavailable, SandboxClient
from sandbox.errors import (
    CircuitOpen,
    ExecutionCanceled,
    ExecutionTimeout,
    InvalidInput,
    PolicyRejected,
    ResourceExhausted,
    SandboxError,
    SkillFailed,
    SkillLoadError,
    SkillNotLoaded,
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
from sandbox.manifest import LimitsConfig, Permissions, SkillManifest
from sandbox.plans import (
    ExecutionContext,
    ExecutionPlan,
    ExecutionStep,
    InvalidPlan,
    PlanFailed,
    StepResult,
    StepType,
)
from sandbox.policy import ExecutionPolicy, Policy, PolicyError, RateLimit, TenantPolicy
from sandbox.sandbox import Sandbox
from sandbox.skill import Skill
from sandbox.tools import HttpToolRunner, ToolContext, ToolError, ToolRunner
from worker.protocol import (
    ErrorKind,
    ExecutionRequest,
    ExecutionResult,
    ExecutionStatus,
    ResourceUsage,
)
from worker.runtime import SkillContext

__all__ = [
    "AsyncSandboxClient",
    "CapabilityReport",
    "CircuitBreaker",
    "CircuitOpen",
    "CircuitState",
    "DaemonError",
    "DaemonUnavailable",
    "ErrorKind",
    "ExecutionCanceled",
    "ExecutionContext",
    "ExecutionLogRecord",
    "ExecutionLogger",
    "ExecutionPlan",
    "ExecutionPolicy",
    "ExecutionRequest",
    "ExecutionResult",
    "ExecutionStatus",
    "ExecutionStep",
    "ExecutionTimeout",
    "HttpToolRunner",
    "InMemoryCircuitBreaker",
    "InvalidInput",
    "InvalidPlan",
    "IsolationConfig",
    "IsolationUnavailable",
    "JsonlExecutionLogger",
    "LimitsConfig",
    "LoggingExecutionLogger",
    "MultiExecutionLogger",
    "Permissions",
    "PlanFailed",
    "Policy",
    "PolicyError",
    "PolicyRejected",
    "RateLimit",
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
    "WorkerFailure",
]
