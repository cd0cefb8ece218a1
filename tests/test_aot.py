"""AOT compile of every Triton kernel for sm_90 (no GPU needed): `python -m drdo_kernels.aot`.

The compile runs in a subprocess without TRITON_INTERPRET (under the interpreter
@triton.jit returns an interpreter object that cannot be compiled). Select with `-k aot`.
"""
import io
import os
import re
import subprocess
import sys

import pytest

from drdo_kernels import aot, logprobs_triton, pair_loss


def _env_without_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH")) if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


@pytest.mark.aot
def test_aot_compiles_every_kernel_for_sm90():
    proc = subprocess.run([sys.executable, "-m", "drdo_kernels.aot", "--arch", "sm_90"], capture_output=True,
                          text=True, env=_env_without_interpreter(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    names = [spec[0] for spec in logprobs_triton.aot_specs() + pair_loss.aot_specs()]
    assert len(names) == len(set(names))
    for name in names:
        row = re.search(rf"^{re.escape(name)}\s+(\d+)\s+(\d+)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s.*\bok\b",
                        proc.stdout, re.MULTILINE)
        assert row, f"{name} missing or not ok in:\n{proc.stdout}"
        assert int(row.group(3)) <= aot.SHARED_LIMITS[90]
    assert f"{len(names)}/{len(names)} kernels ok" in proc.stdout


def test_aot_specs_cover_dtypes_and_bias():
    names = {spec[0] for spec in logprobs_triton.aot_specs()}
    for kind in ("fwd", "bwd"):
        for dt in ("bf16", "fp16", "fp32"):
            for bias in (0, 1):
                assert f"logprobs_{kind}_{dt}_bias{bias}" in names
    for name, fn, signature, constexprs, num_warps, num_stages in logprobs_triton.aot_specs():
        assert set(signature) | set(constexprs) == set(fn.arg_names), name
        assert num_warps in (1, 2, 4, 8, 16) and num_stages >= 1


def test_aot_arch_parsing_and_interpreter_refusal(monkeypatch, capsys):
    assert aot.parse_arch("sm_90") == 90 and aot.parse_arch("80") == 80
    with pytest.raises(Exception, match="--arch"):
        aot.parse_arch("sm_75")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert aot.main(["--arch", "sm_90"]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err


def test_aot_reports_unimportable_spec_module():
    out = io.StringIO()
    assert aot.run(90, modules=("drdo_kernels.no_such_module",), out=out) == 1
    assert "FAILED to collect kernel specs" in out.getvalue()
