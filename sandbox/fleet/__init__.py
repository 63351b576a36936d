"""A fleet of sandbox hosts: Celery workers on a Redis broker, each owning one `Sandbox`.

`FleetClient` is the `Sandbox` API over the fleet; `skill-sandbox worker` runs a worker;
`skill-sandbox fleet status` shows it. Needs the `fleet` extra (celery, redis). See
docs/deployment.md for placement, Redis and the failure semantics.
"""

from sandbox.fleet.client import FleetClient
from sandbox.fleet.protocol import DEFAULT_GROUP, DEFAULT_PREFIX, queue_name

__all__ = ["DEFAULT_GROUP", "DEFAULT_PREFIX", "FleetClient", "queue_name"]
