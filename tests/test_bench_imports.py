"""The bench package's import graph: no circle. ``harness`` (and ``models``) import no bench module;
each bench module imports, of this project, only the harness, ``ops`` and ``reference`` (the in-vLLM
benches also ``models``, the layers, the package root and the tiny-model builders); only
``__main__`` imports bench modules, and registers every one. Read from the source (every import
statement, also those inside functions), then each module imported for real."""

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import vllm_gdn_cpu.tools.bench as bench_pkg

PKG = "vllm_gdn_cpu.tools.bench"
LEAVES = {"harness", "models"}  # shared by the bench modules; they import none of them
IN_VLLM_BENCHES = {"e2e", "mamba2_layer", "mtp"}  # start engines: may import models, layers, the plugin
ALLOWED = {  # what each kind of module may import of vllm_gdn_cpu (prefixes)
    "leaf": ("vllm_gdn_cpu.ops",),
    "kernel": ("vllm_gdn_cpu.ops", "vllm_gdn_cpu.reference", f"{PKG}.harness"),
    "in_vllm": ("vllm_gdn_cpu.ops", "vllm_gdn_cpu.reference", f"{PKG}.harness", f"{PKG}.models",
                "vllm_gdn_cpu.layers.", "vllm_gdn_cpu.testing.tiny_"),
}


def module_names() -> list[str]:
    return sorted(info.name for info in pkgutil.iter_modules(bench_pkg.__path__))


# Every other module is a kernel bench (a new family's module needs no entry here): gdn, mamba2,
# mamba1, kda, gemv, overhead, roofline.
KERNEL_BENCHES = set(module_names()) - LEAVES - IN_VLLM_BENCHES - {"__main__"}


def project_imports(name: str) -> set[str]:
    """Every vllm_gdn_cpu module (or package attribute) the source of PKG.name imports, anywhere in it."""
    tree = ast.parse((Path(bench_pkg.__file__).parent / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name}: relative import"
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] == "vllm_gdn_cpu"}


def bench_edges(name: str) -> set[str]:
    prefix = f"{PKG}."
    return {m[len(prefix):].split(".")[0] for m in project_imports(name) if m.startswith(prefix)}


def test_every_module_is_classified():
    assert set(module_names()) == LEAVES | KERNEL_BENCHES | IN_VLLM_BENCHES | {"__main__"}
    assert {"gdn", "mamba2", "mamba1", "kda", "gemv", "overhead", "roofline"} <= KERNEL_BENCHES


@pytest.mark.parametrize("name", sorted(LEAVES | KERNEL_BENCHES | IN_VLLM_BENCHES))
def test_bench_module_imports_only_the_harness_ops_and_reference(name):
    kind = "leaf" if name in LEAVES else "kernel" if name in KERNEL_BENCHES else "in_vllm"
    for imported in project_imports(name):
        if imported in ("vllm_gdn_cpu.ops", "vllm_gdn_cpu.reference") and kind != "leaf":
            continue  # `from vllm_gdn_cpu import ops, reference`
        if kind == "in_vllm" and imported in ("vllm_gdn_cpu", "vllm_gdn_cpu.register"):
            continue  # `import vllm_gdn_cpu` to register the plugin in-process
        assert imported.startswith(ALLOWED[kind]), f"{name} imports {imported}"
    assert bench_edges(name) <= ({"harness", "models"} - {name} if kind != "leaf" else set()), name
    importlib.import_module(f"{PKG}.{name}")


def test_no_circle_and_one_registry():
    edges = {name: bench_edges(name) for name in module_names()}
    assert edges["__main__"] >= KERNEL_BENCHES | IN_VLLM_BENCHES  # every bench registered there
    assert not any("__main__" in targets for targets in edges.values())
    for leaf in LEAVES:
        assert not edges[leaf], f"{leaf} imports {edges[leaf]}"
    # With the leaves importing nothing and the rest importing only the leaves, a path of length
    # two never returns: check it explicitly over the whole graph anyway.
    state: dict[str, int] = {}

    def visit(node, path):
        assert state.get(node) != 1, f"import circle: {' -> '.join(path + [node])}"
        if state.get(node) == 2:
            return
        state[node] = 1
        for target in edges.get(node, ()):
            visit(target, path + [node])
        state[node] = 2

    for name in edges:
        visit(name, [])
    main = importlib.import_module(f"{PKG}.__main__")
    parser = main.build_parser()
    sub = next(a for a in parser._actions if a.dest == "mode")
    for command, subparser in sub.choices.items():
        assert callable(subparser.get_default("run")), f"subcommand {command} names no function to run"


def test_no_bench_changes_the_floating_point_environment():
    """The benches measure what users get: none flushes denormals (torch.set_flush_denormal) or
    otherwise sets the floating-point environment, in-process or in the engines it starts."""
    for name in module_names():
        source = (Path(bench_pkg.__file__).parent / f"{name}.py").read_text()
        calls = {node.func.attr for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
        assert "set_flush_denormal" not in calls, name
