"""The import rules of docs/ARCHITECTURE.md, checked statically over every module of rewardsvc (imports inside
functions included, so a lazy import cannot dodge a rule)."""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "rewardsvc"

SHARED = {"rewardsvc", "rewardsvc.config", "rewardsvc.errors", "rewardsvc.types", "rewardsvc.messages",
          "rewardsvc.normalization", "rewardsvc.tracing"}
INTEGRATIONS = {"rewardsvc.integrations", "rewardsvc.integrations.trl", "rewardsvc.integrations.trl_functions",
                "rewardsvc.integrations.verl", "rewardsvc.integrations.verl_score", "rewardsvc.integrations.verl_reward_loop",
                "rewardsvc.integrations.partial_batches", "rewardsvc.integrations.openrlhf", "rewardsvc.integrations.chat_text",
                "rewardsvc.integrations.vllm_pooling"}
# A module that runs inside a trainer's own process and subclasses its classes may import that trainer.
FRAMEWORK_IMPORTS = {"rewardsvc.integrations.verl_reward_loop": {"verl"}}
CLIENT_SIDE = SHARED | INTEGRATIONS | {"rewardsvc.client", "rewardsvc.wire"}
PROTOBUF_USERS = {"rewardsvc.wire", "rewardsvc.client", "rewardsvc.serving.servicer", "rewardsvc.serving.server",
                  "rewardsvc.serving.ray_serve",
                  "rewardsvc.serving.http"}
GRPC_USERS = {"rewardsvc.client", "rewardsvc.serving.servicer", "rewardsvc.serving.interceptors", "rewardsvc.serving.server",
              "rewardsvc.serving.ray_serve"}  # ray_serve: the handlers behind Ray Serve's gRPC proxy
GRPC_PACKAGES = {"grpc", "grpc_health", "grpc_reflection"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    found = {_module_name(p): p for p in PACKAGE_DIR.rglob("*.py") if "_proto" not in p.parts}
    assert "rewardsvc.model.scorer" in found and "rewardsvc.client" in found
    return found


@cache
def imports(module: str) -> frozenset[str]:
    """Absolute names of everything `module` imports; `from X import a` gives X and X.a."""
    path = modules()[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            pytest.fail(f"{module}: __import__ hides an import from these rules; use importlib or a plain import")
    return frozenset(names)


def internal(names) -> set[str]:
    """The rewardsvc modules among `names` (X.a is kept only when it is a module)."""
    return {n for n in names if n in modules()}


def top_levels(names) -> set[str]:
    return {n.split(".")[0] for n in names}


def closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(internal(imports(m)))
    return seen


def in_package(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


@pytest.mark.parametrize("root", ["rewardsvc.client", *sorted(INTEGRATIONS)])
def test_the_client_side_is_torch_free(root):
    reached = closure(root)
    assert reached <= CLIENT_SIDE, f"{root} reaches {sorted(reached - CLIENT_SIDE)}"
    external = set().union(*(top_levels(imports(m)) - FRAMEWORK_IMPORTS.get(m, set()) for m in reached)) - {"rewardsvc"}
    allowed = set(sys.stdlib_module_names) | {"grpc", "grpc_health", "google"}
    assert external <= allowed, f"the client side imports {sorted(external - allowed)}"


def test_every_integration_module_is_listed():
    assert {m for m in modules() if in_package(m, "rewardsvc.integrations")} == INTEGRATIONS


def test_model_never_imports_grpc_protobuf_or_upper_layers():
    for module in modules():
        if not in_package(module, "rewardsvc.model"):
            continue
        names = imports(module)
        assert not top_levels(names) & (GRPC_PACKAGES | {"google"}), module
        upper = {n for n in internal(names) if in_package(n, "rewardsvc.serving", "rewardsvc.training", "rewardsvc.evaluation",
                                                          "rewardsvc.cli", "rewardsvc.client", "rewardsvc.wire")}  # fmt: skip
        assert not upper, f"{module} imports {sorted(upper)}"


def test_protobuf_and_grpc_stay_in_the_wire_modules():
    for module in modules():
        names = imports(module)
        if "google" in top_levels(names) or any(n.startswith("rewardsvc._proto") for n in names):
            assert module in PROTOBUF_USERS, f"{module} imports protobuf"
        if top_levels(names) & GRPC_PACKAGES:
            assert module in GRPC_USERS, f"{module} imports grpc"


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("rewardsvc.serving", ("rewardsvc.training", "rewardsvc.evaluation", "rewardsvc.cli", "rewardsvc.client")),
        ("rewardsvc.training", ("rewardsvc.serving", "rewardsvc.cli", "rewardsvc.client", "rewardsvc.wire")),
        ("rewardsvc.evaluation", ("rewardsvc.serving", "rewardsvc.training", "rewardsvc.cli", "rewardsvc.client")),
        ("rewardsvc.client", ("rewardsvc.cli",)),
        ("rewardsvc.integrations", ("rewardsvc.serving", "rewardsvc.model", "rewardsvc.training", "rewardsvc.cli")),
    ],
)
def test_layers_import_downwards(package, forbidden):
    for module in modules():
        if in_package(module, package):
            bad = {n for n in internal(imports(module)) if in_package(n, *forbidden)}
            assert not bad, f"{module} imports {sorted(bad)}"


def test_who_may_import_integrations():
    # Trainer glue sits above the client: only the CLI and the HTTP transport (which serves the trainers' own
    # protocols) import it, and the client only its TRL shortcut's machinery, which imports no client.
    for module in modules():
        used = {n for n in internal(imports(module)) if in_package(n, "rewardsvc.integrations")}
        if not used or in_package(module, "rewardsvc.integrations", "rewardsvc.cli", "rewardsvc.serving"):
            continue
        assert module == "rewardsvc.client" and used == {"rewardsvc.integrations.trl_functions"}, f"{module} imports {sorted(used)}"
    assert "rewardsvc.client" not in closure("rewardsvc.integrations.trl_functions")


def import_graph() -> dict[str, set[str]]:
    """module -> the rewardsvc modules it imports. Importing a module's own parent package is left out:
    Python initializes the parents first anyway (`from . import sibling` in a submodule is not a cycle)."""
    return {m: {n for n in internal(imports(m)) if not m.startswith(n + ".") and n != m} for m in modules()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            child = next(edges, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    # Lazy imports count: a cycle through a function-level import is still two modules that need each other.
    assert cycles(import_graph()) == []


def test_shared_modules_import_only_each_other():
    for module in SHARED:
        assert internal(imports(module)) <= SHARED, module
        assert top_levels(imports(module)) - {"rewardsvc"} <= set(sys.stdlib_module_names), module


def test_the_cli_enters_serving_only_to_serve():
    # `rewardsvc score`, `compare`, ... compute locally through the model (or a server through the client):
    # nothing but `serve` reaches the serving layer, not even for maths.
    for module in modules():
        if in_package(module, "rewardsvc.cli") and module != "rewardsvc.cli.serve":
            reached = {m for m in closure(module) if in_package(m, "rewardsvc.serving")}
            assert not reached, f"{module} reaches {sorted(reached)}"


def test_rules_see_lazy_imports():
    # The rules would be toothless if imports inside functions were missed: cli.main imports the scorer lazily.
    assert "rewardsvc.model.scorer" in internal(imports("rewardsvc.cli.main"))
