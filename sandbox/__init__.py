"""Skill Sandbox: run untrusted skills in isolated, resource-limited worker processes.

    from sandbox import ExecutionRequest, Sandbox, Skill

    with Sandbox([Skill.from_dir("skills_examples/echo")]) as sandbox:
        result = sandbox.execute(ExecutionRequest(skill_id="examples/echo", input=b'{"x": 1}'))
        print(result.status, result.output, result.resource_usage)
"""

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
)
from sandbox.manifest import LimitsConfig, Permissions, SkillManifest
from sandbox.sandbox import Sandbox
from sandbox.skill import Skill
from worker.protocol import ExecutionRequest, ExecutionResult, ExecutionStatus, ResourceUsage
from worker.runtime import SkillContext

__all__ = [
    "CircuitOpen",
    "ExecutionCanceled",
    "ExecutionRequest",
    "ExecutionResult",
    "ExecutionStatus",
    "ExecutionTimeout",
    "InvalidInput",
    "LimitsConfig",
    "Permissions",
    "PolicyRejected",
    "ResourceExhausted",
    "ResourceUsage",
    "Sandbox",
    "SandboxError",
    "Skill",
    "SkillContext",
    "SkillFailed",
    "SkillLoadError",
    "SkillManifest",
    "SkillNotLoaded",
]
