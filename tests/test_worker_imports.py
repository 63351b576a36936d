"""`worker/` runs next to hostile code: it stays small and imports nothing heavy."""

from __future__ import annotations

import json
import subprocess
import sys

#: wasmtime: only a WASM skill's zygote imports it (worker.wasm.prepare), lazily.
HEAVY = ["sandbox", "pydantic", "httpx", "psutil", "click", "jsonschema", "yaml", "wasmtime"]
WORKER_MODULES = ["worker.zygote", "worker.child", "worker.spare", "worker.runtime",
                  "worker.spawn", "worker.isolation", "worker.seccomp", "worker.landlock",
                  "worker.namespaces", "worker.protocol", "worker.wasm"]


def test_the_worker_modules_load_nothing_heavy_in_a_fresh_isolated_interpreter() -> None:
    script = (f"import importlib, json, sys\n"
              f"for name in {WORKER_MODULES!r}:\n"
              f"    importlib.import_module(name)\n"
              f"print(json.dumps(sorted(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True,
                          timeout=30, check=True)
    loaded = json.loads(done.stdout)
    assert set(WORKER_MODULES) <= set(loaded)  # control: they were imported
    heavy = sorted(name for name in loaded if name.split(".")[0] in HEAVY)
    assert heavy == [], f"worker/ pulled in {heavy}"
