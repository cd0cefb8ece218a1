"""The code's layers and hygiene, read from the source of drdo, drdo_kernels and benchmarks.

* A module imports only lower layers (or its own group), never a higher one; the kernels import no
  drdo module but the reference losses.
* No module imports another module's private names (a leading underscore).
* No module of drdo or drdo_kernels is over :data:`MAX_LINES` lines.
* The import graph of each package (benchmarks' modules included) has no cycle.
"""
from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("drdo", "drdo_kernels", "benchmarks")

#: Lowest first. A module may import its own group and the groups of lower layers only.
LAYERS = (
    ("drdo_kernels.triton_runtime", "drdo.errors"),
    ("drdo.atomic", "drdo.run_record"),
    ("drdo.losses", "drdo.tokenizer", "drdo.jsonl", "drdo.progress", "drdo.process_settings"),
    ("drdo.hub",),
    ("drdo_kernels", "drdo.data"),
    ("drdo.models",),
    ("drdo.policy_logprobs",),
    ("drdo.config",),
    ("drdo.training", "drdo.pipeline", "drdo.integrations"),
    ("drdo.demo",),
    ("drdo.cli",),
    ("drdo.__main__",),
    # benchmarks, bottom up: the package, the method registry and shared constants, the inputs, the work
    # model and the timing, the analytic model, the reports, the grid runner, then the scripts
    ("benchmarks",),
    ("benchmarks.methods", "benchmarks.common"),
    ("benchmarks.heads", "benchmarks.peers"),
    ("benchmarks.work", "benchmarks.measure"),
    ("benchmarks.model",),
    ("benchmarks.report", "benchmarks.docs_table"),
    ("benchmarks.runner", "benchmarks.trl_train"),
    ("benchmarks.bench_logprobs", "benchmarks.bench_loss", "benchmarks.bench_padding_free", "benchmarks.paired"),
    ("benchmarks.bench_train", "benchmarks.profile_loss", "benchmarks.dry_run"),
)
_GROUPS = {group: level for level, groups in enumerate(LAYERS) for group in groups}
#: The only drdo groups a drdo_kernels module may import, although more of drdo lies below it.
KERNELS_MAY_IMPORT = ("drdo.losses", "drdo.errors")
#: The most lines a module of drdo or drdo_kernels may have.
MAX_LINES = 600


def _group(module: str) -> str | None:
    """The group of a dotted module name (longest matching prefix), or None for the bare package."""
    matches = [g for g in _GROUPS if module == g or module.startswith(g + ".")]
    return max(matches, key=len) if matches else None


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _path_of(module: str) -> pathlib.Path:
    base = ROOT.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _is_ours(module: str) -> bool:
    """Whether a dotted name is a module or package of drdo, drdo_kernels or benchmarks."""
    return module.split(".")[0] in PACKAGES and _path_of(module).is_file()


def _sources(*packages: str) -> list[pathlib.Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def _import_base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module if is_package else module.rpartition(".")[0]
    parts = package.split(".")
    anchor = parts[: len(parts) - (node.level - 1)]
    return ".".join(anchor + ([node.module] if node.module else []))


def _imports(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every layered module ``source`` (the text of ``module``) imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _import_base(node, module, is_package)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from drdo import models`
    return {name for name in found if _group(name) is not None}


def _file_imports(path: pathlib.Path) -> set[str]:
    return _imports(path.read_text(encoding="utf-8"), _module_name(path), path.name == "__init__.py")


def test_every_module_has_a_layer():
    missing = [_module_name(p) for p in _sources(*PACKAGES)
               if p.name != "__init__.py" and _group(_module_name(p)) is None]
    assert not missing, f"add these modules to LAYERS: {missing}"


def _violations(module: str, imports: set[str]) -> list[str]:
    """The imports of ``module`` that are neither in its own group nor in a lower layer, and, for a
    kernel module, the drdo modules other than :data:`KERNELS_MAY_IMPORT`."""
    group = _group(module)
    bad = {name for name in imports if _group(name) != group and _GROUPS[_group(name)] >= _GROUPS[group]}
    if module.split(".")[0] == "drdo_kernels":
        bad |= {name for name in imports if name.split(".")[0] == "drdo" and _group(name) not in KERNELS_MAY_IMPORT}
    return sorted(bad)


@pytest.mark.parametrize("path", [p for p in _sources(*PACKAGES) if _group(_module_name(p))], ids=_module_name)
def test_imports_go_down_the_layers(path):
    module = _module_name(path)
    bad = _violations(module, _file_imports(path))
    assert not bad, f"{module} (layer {_GROUPS[_group(module)]}) imports a higher or sideways module: {bad}"


def test_layer_check_flags_upward_and_sideways_imports():
    assert _violations("drdo.pipeline.scoring", {"drdo.training.loop", "drdo.models", "drdo.pipeline.evaluate"}) \
        == ["drdo.training.loop"]
    assert _violations("drdo.models", {"drdo.config", "drdo.losses"}) == ["drdo.config"]
    assert _violations("drdo.data.preferences", {"drdo.models"}) == ["drdo.models"]


@pytest.mark.parametrize("module, planted, flagged", [
    ("drdo_kernels.triton_runtime", "import drdo.cli", ["drdo.cli"]),
    ("drdo_kernels.triton_runtime", "def f():\n    from . import logprobs", ["drdo_kernels", "drdo_kernels.logprobs"]),
    ("drdo_kernels.logprobs", "from drdo.tokenizer import TINY_VOCAB_SIZE",  # lower, but not the losses
     ["drdo.tokenizer", "drdo.tokenizer.TINY_VOCAB_SIZE"]),
    ("drdo_kernels.fused_losses", "from drdo.losses import drdo_loss", []),
    ("drdo.losses", "from benchmarks.measure import sync", ["benchmarks.measure", "benchmarks.measure.sync"]),
    ("drdo.models", "from drdo_kernels import aot", []),
    ("benchmarks.measure", "import drdo.cli", []),
])
def test_a_planted_import_is_flagged_in_every_package(module, planted, flagged):
    """The module's own source with one import added: only that import is reported, and only when it
    goes up or sideways (or, from a kernel, into drdo beyond the losses)."""
    path = _path_of(module)
    source = path.read_text(encoding="utf-8") + "\n\n" + planted + "\n"
    assert _violations(module, _imports(source, module, path.name == "__init__.py")) == flagged


def _graph(package: str, planted: dict[str, str] | None = None) -> dict[str, set[str]]:
    """module -> the modules of ``package`` it imports (at the top or inside functions); ``planted``:
    module -> a line appended to its source."""
    graph = {}
    for path in _sources(package):
        module = _module_name(path)
        source = path.read_text(encoding="utf-8") + "\n\n" + (planted or {}).get(module, "") + "\n"
        found = _imports(source, module, path.name == "__init__.py")
        graph[module] = {name for name in found if _is_ours(name) and name != module and name != package}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as [a, b, ..., a], or [] when it has none (depth-first search)."""
    state, stack = {}, []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package):
    cycle = _cycle(_graph(package))
    assert not cycle, f"{package} has an import cycle: {' -> '.join(cycle)}"


@pytest.mark.parametrize("module, planted", [
    ("benchmarks.work", "from benchmarks.bench_loss import rows_and_len"),
    ("benchmarks.common", "def f():\n    from benchmarks.heads import LOGIT_REGIMES"),
    ("benchmarks.methods", "from benchmarks import runner"),
])
def test_a_planted_benchmarks_cycle_is_found(module, planted):
    """One import added to a low benchmarks module closes a cycle: the cycle check finds it, and the
    layer check flags that import."""
    cycle = _cycle(_graph("benchmarks", {module: planted}))
    assert cycle and module in cycle
    path = _path_of(module)
    source = path.read_text(encoding="utf-8") + "\n\n" + planted + "\n"
    assert _violations(module, _imports(source, module, path.name == "__init__.py"))


def _private_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """The private names (a leading underscore, not a dunder) ``source`` takes from another of our
    modules: ``from m import _name``, or ``m._name`` on a module it imported."""
    tree = ast.parse(source)
    modules = {}  # local name -> the module of ours it is bound to
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    modules[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    modules[top] = top
        elif isinstance(node, ast.ImportFrom):
            base = _import_base(node, module, is_package)
            for alias in node.names:
                name = f"{base}.{alias.name}"
                if not _is_ours(base) and not _is_ours(name):
                    continue
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.add(name)
                if _is_ours(name):
                    modules[alias.asname or alias.name] = name
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        chain, value = [], node.value
        while isinstance(value, ast.Attribute):
            chain.insert(0, value.attr)
            value = value.value
        if isinstance(value, ast.Name) and value.id in modules:
            owner = ".".join([modules[value.id], *chain])
            if _is_ours(owner) and owner != module:
                found.add(f"{owner}.{node.attr}")
    return sorted(found)


@pytest.mark.parametrize("path", _sources(*PACKAGES), ids=_module_name)
def test_no_module_imports_private_names(path):
    found = _private_imports(path.read_text(encoding="utf-8"), _module_name(path), path.name == "__init__.py")
    assert not found, f"{_module_name(path)} uses private names of other modules (make them public): {found}"


def test_private_import_check_flags_imported_and_attribute_access():
    planted = ("from __future__ import annotations\n"
               "import datetime as _dt\n"
               "from drdo.models.loading import _resolve_dtype, load_causal_lm\n"
               "from drdo import models\n"
               "from . import rounding\n"
               "import drdo_kernels.logprobs_chunked as chunked\n"
               "def f(self):\n"
               "    from .triton_runtime import _hidden\n"
               "    return models.loading._is_cuda, rounding._x, chunked._y, models.loading, self._z, _dt._w\n")
    assert _private_imports(planted, "drdo_kernels.softmax_fold") == [
        "drdo.models.loading._is_cuda", "drdo.models.loading._resolve_dtype", "drdo_kernels.logprobs_chunked._y",
        "drdo_kernels.rounding._x", "drdo_kernels.triton_runtime._hidden"]


@pytest.mark.parametrize("path", _sources("drdo", "drdo_kernels"), ids=_module_name)
def test_no_module_is_over_the_line_limit(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{_module_name(path)} has {lines} lines (at most {MAX_LINES}): split it by job"


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
