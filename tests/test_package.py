"""The package as a user meets it: `import sandbox` is cheap, every public name resolves, and
what ships in the wheel runs from it."""

from __future__ import annotations

import ast
import graphlib
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import sandbox

ROOT = Path(__file__).resolve().parent.parent

#: Dependencies of parts a program may never use: the client (httpx), the CLI (click), the
#: daemon (starlette, uvicorn, prometheus), schemas (jsonschema) and YAML files.
HEAVY = ["httpx", "httpcore", "click", "starlette", "uvicorn", "prometheus_client",
         "jsonschema", "yaml"]


def _loaded_after(statement: str) -> set[str]:
    """Top-level modules loaded by `statement` in a fresh isolated interpreter."""
    script = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))\n"
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True,
                          timeout=60, check=True)
    return {name.split(".")[0] for name in json.loads(done.stdout)}


def test_import_sandbox_loads_no_heavy_dependency() -> None:
    assert _loaded_after("import sandbox") & set(HEAVY) == set()
    # control: the same check sees them once a part that needs them is used
    assert {"httpx", "httpcore"} <= _loaded_after("import sandbox; sandbox.SandboxClient")


def test_running_skills_loads_neither_client_cli_daemon_nor_yaml() -> None:
    loaded = _loaded_after("from sandbox import ExecutionRequest, Sandbox, Skill")
    assert loaded & set(HEAVY) == set()
    assert "pydantic" in loaded  # control: the manifest models did load


@pytest.mark.parametrize("name", sandbox.__all__)
def test_every_public_name_resolves_to_its_defining_module(name: str) -> None:
    value = getattr(sandbox, name)
    module = importlib.import_module(sandbox._EXPORTS[name])
    assert getattr(module, name) is value
    assert name in dir(sandbox)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        sandbox.Nope  # noqa: B018
    with pytest.raises(ImportError):
        exec("from sandbox import Nope", {})


def _imports_at_run_time(path: Path, modules: set[str]) -> set[str]:
    """The modules among `modules` that `path` imports when it runs: at module level or in a
    function, but not under `if TYPE_CHECKING:` (annotations only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(node) for branch in ast.walk(tree)
                   if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
                   for node in ast.walk(branch)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found & modules


def _module_graph(root: Path) -> dict[str, set[str]]:
    paths = {}
    for path in [*root.glob("sandbox/**/*.py"), *root.glob("worker/**/*.py")]:
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        paths[name.removesuffix(".__init__")] = path
    return {name: _imports_at_run_time(path, set(paths)) - {name}
            for name, path in paths.items()}


def test_no_module_imports_itself_back_at_run_time() -> None:
    graph = _module_graph(ROOT)
    assert {"sandbox.sandbox", "sandbox.planrun", "sandbox.errors"} <= set(graph)
    assert "sandbox.planrun" in graph["sandbox.sandbox"]  # control: edges are seen
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle
