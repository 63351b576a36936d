"""The long-lived supervisor daemon: config (`config`), HTTP API (`app`), process (`server`).

Kept import-light: the client and the CLI import `sandbox.daemon.config` for defaults without
pulling in the ASGI stack.
"""
