"""A policy that SIGHUP can replace while executions are in flight.

`Policy` counts each tenant's executions in flight between `check` and `release`. Swapping the
sandbox's policy object directly would send the releases of executions admitted by the old
policy to the new one, miscounting both; this wrapper releases each execution to the policy
that admitted it.
"""

from __future__ import annotations

import threading
from typing import Any

from sandbox.policy import ExecutionPolicy
from sandbox.skill import Skill
from worker.protocol import ExecutionRequest


class ReloadablePolicy:
    def __init__(self, policy: ExecutionPolicy | None = None) -> None:
        self._policy = policy
        self._admitted: dict[int, Any] = {}
        self._lock = threading.Lock()

    @property
    def current(self) -> ExecutionPolicy | None:
        return self._policy

    def replace(self, policy: ExecutionPolicy | None) -> None:
        """New executions are checked by `policy`; those in flight finish under the old one."""
        self._policy = policy

    def check(self, request: ExecutionRequest, skill: Skill) -> str | None:
        policy = self._policy
        if policy is None:
            return None
        reason = policy.check(request, skill)
        if reason is None and hasattr(policy, "release"):
            with self._lock:  # the request object lives until `release`: its id is unique
                self._admitted[id(request)] = policy
        return reason

    def release(self, request: ExecutionRequest, skill: Skill) -> None:
        with self._lock:
            policy = self._admitted.pop(id(request), None)
        if policy is not None:
            policy.release(request, skill)
