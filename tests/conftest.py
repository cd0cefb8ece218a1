"""Test setup: nothing reaches a model hub, the datasets cache lives in a throwaway folder, and
the Triton interpreter is NOT switched on: the default run is the path users run.

Two markers split the suite by what a test exercises:

* ``triton``: Triton kernels (a ``backend`` parameter equal to "triton", a ``use_triton``
  parameter that is True, or a module that sets ``pytestmark = pytest.mark.triton``). They run
  where Triton runs: on a CUDA GPU, or on the CPU in Triton's interpreter, which must be
  switched on before triton is imported, i.e. in its own process:
  ``TRITON_INTERPRET=1 python -m pytest -q -m "triton or chunked" tests``.
  Elsewhere they are deselected.
* ``chunked``: the chunked backend (a ``backend`` parameter equal to "chunked"). In the default
  run on a CPU it folds each chunk with PyTorch, as users' CPUs do; the interpreter run above
  repeats it with the Triton fold.

Property-based tests (``hypothesis``) run under the profile "ci": derandomized where the test
asks for it, no example database, no deadline, and no shrinking, so that a failure prints the
case it failed on at once instead of minutes later. ``HYPOTHESIS_PROFILE=shrink`` shrinks a
failure to a smaller case.
"""
import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="drdo-tests-datasets-"))
os.environ.setdefault("MPLBACKEND", "Agg")

try:
    from hypothesis import HealthCheck, Phase, settings
except ImportError:  # only tests/test_gradients.py needs it (a [dev] dependency)
    pass
else:
    settings.register_profile("ci", phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target],
                              deadline=None, database=None, print_blob=True, suppress_health_check=list(HealthCheck))
    settings.register_profile("shrink", settings.get_profile("ci"), phases=list(Phase))
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

INTERPRETER_COMMAND = 'TRITON_INTERPRET=1 python -m pytest -q -m "triton or chunked" tests'


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A JSONL file of eight preference pairs, shared by the fault-injection tests (test_faults*.py)."""
    from test_faults import rows, write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", rows())


def pytest_configure(config):
    config.addinivalue_line("markers", "aot: ahead-of-time Triton compile for sm_90/sm_80 (runs in a subprocess)")
    config.addinivalue_line("markers", f"triton: runs Triton kernels (a CUDA GPU, or `{INTERPRETER_COMMAND}`)")
    config.addinivalue_line("markers",
                            "chunked: the chunked backend (PyTorch fold on a CPU, Triton fold where Triton runs)")


def _param_marks(item) -> list[str]:
    params = getattr(getattr(item, "callspec", None), "params", {})
    marks = []
    if params.get("backend") == "triton" or params.get("use_triton") is True:
        marks.append("triton")
    if params.get("backend") == "chunked":
        marks.append("chunked")
    return marks


def _triton_runs() -> bool:
    from drdo_kernels.triton_runtime import triton_runs_on

    return triton_runs_on(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        for name in _param_marks(item):
            item.add_marker(getattr(pytest.mark, name))
    if _triton_runs():
        return
    kept = [item for item in items if item.get_closest_marker("triton") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("triton")])
        items[:] = kept


def pytest_report_header(config):
    if _triton_runs():
        return "Triton kernels: run (CUDA or TRITON_INTERPRET=1)"
    return f"Triton kernels: deselected (no GPU, no interpreter); run them with `{INTERPRETER_COMMAND}`"


def pytest_terminal_summary(terminalreporter):
    harness = __import__("sys").modules.get("gradient_cases")
    if harness is not None and harness.WORST.by_dtype:
        terminalreporter.write_line(harness.WORST.summary())
