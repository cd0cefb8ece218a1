"""The package's layers: a module imports only lower layers (or its own group), never a higher one."""
from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: Lowest first. A module may import its own group and the groups of lower layers only.
LAYERS = (
    ("drdo.atomic", "drdo.run_record"),
    ("drdo.losses", "drdo.tokenizer", "drdo.jsonl", "drdo.progress", "drdo.process_settings", "drdo.errors"),
    ("drdo.hub",),
    ("drdo_kernels", "drdo.data"),
    ("drdo.models",),
    ("drdo.policy_logprobs",),
    ("drdo.config",),
    ("drdo.training", "drdo.pipeline", "drdo.integrations"),
    ("drdo.demo",),
    ("drdo.cli",),
    ("drdo.__main__",),
)
_GROUPS = {group: level for level, groups in enumerate(LAYERS) for group in groups}


def _group(module: str) -> str | None:
    """The group of a dotted module name (longest matching prefix), or None for the bare package."""
    matches = [g for g in _GROUPS if module == g or module.startswith(g + ".")]
    return max(matches, key=len) if matches else None


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Every drdo / drdo_kernels module ``path`` imports, at the top or inside functions."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from drdo import models`
    return {name for name in found if _group(name) is not None}


def _drdo_modules() -> list[pathlib.Path]:
    return sorted((ROOT / "drdo").rglob("*.py"))


def test_every_module_has_a_layer():
    missing = [_module_name(p) for p in _drdo_modules() if p.name != "__init__.py" and _group(_module_name(p)) is None]
    assert not missing, f"add these modules to LAYERS: {missing}"


def _violations(module: str, imports: set[str]) -> list[str]:
    """The imports of ``module`` that are neither in its own group nor in a lower layer."""
    group = _group(module)
    return [name for name in sorted(imports) if _group(name) != group and _GROUPS[_group(name)] >= _GROUPS[group]]


@pytest.mark.parametrize("path", [p for p in _drdo_modules() if _group(_module_name(p))], ids=_module_name)
def test_imports_go_down_the_layers(path):
    module = _module_name(path)
    bad = _violations(module, _imports(path))
    assert not bad, f"{module} (layer {_GROUPS[_group(module)]}) imports a higher or sideways module: {bad}"


def test_layer_check_flags_upward_and_sideways_imports():
    assert _violations("drdo.pipeline.scoring", {"drdo.training.loop", "drdo.models", "drdo.pipeline.evaluate"}) \
        == ["drdo.training.loop"]
    assert _violations("drdo.models", {"drdo.config", "drdo.losses"}) == ["drdo.config"]
    assert _violations("drdo.data.preferences", {"drdo.models"}) == ["drdo.models"]


def test_pipeline_imports_no_training_module():
    """Importing every offline pass in a fresh interpreter loads no drdo.training module."""
    modules = sorted(_module_name(p) for p in (ROOT / "drdo" / "pipeline").glob("*.py"))
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('drdo.training')))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
