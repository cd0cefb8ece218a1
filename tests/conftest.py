"""Test setup: Triton runs in its CPU interpreter (must be set before triton is imported),
nothing reaches a model hub, and the datasets cache lives in a throwaway folder."""
import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="drdo-tests-datasets-"))
os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_configure(config):
    config.addinivalue_line("markers", "aot: ahead-of-time Triton compile for sm_90/sm_80 (runs in a subprocess)")
