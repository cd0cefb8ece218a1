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

from drdo_kernels import aot, logprobs_triton, pair_loss, softmax_fold


def _env_without_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH")) if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


_ROW = re.compile(r"^(?P<name>\S+)\s+(?P<warps>\d+)\s+(?P<stages>\d+)\s+(?P<variant>aligned|generic)\s+"
                  r"(?P<shared>\d+)\s+(?P<regs>\S+)\s+(?P<spill_st>\S+)\s+(?P<spill_ld>\S+)\s+(?P<mma>\S+)\s+"
                  r"(?P<secs>\S+)\s+(?P<status>.*)$", re.MULTILINE)


@pytest.fixture(scope="module")
def aot_reports():
    """{capability: (returncode, stdout + stderr)} of `python -m drdo_kernels.aot` for sm_90 and sm_80,
    run side by side in two subprocesses."""
    procs = {cap: subprocess.Popen([sys.executable, "-m", "drdo_kernels.aot", "--arch", f"sm_{cap}"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=_env_without_interpreter())
             for cap in (90, 80)}
    out = {}
    for cap, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        out[cap] = (proc.returncode, stdout, stderr)
    return out


def _rows(stdout):
    return {(m["name"], m["variant"]): m for m in _ROW.finditer(stdout)}


@pytest.mark.aot
@pytest.mark.parametrize("cap", [90, 80])
def test_aot_compiles_every_kernel_in_both_specialisations(aot_reports, cap):
    code, stdout, stderr = aot_reports[cap]
    assert code == 0, stdout[-4000:] + stderr[-4000:]
    names = [spec[0] for spec in logprobs_triton.aot_specs() + pair_loss.aot_specs() + softmax_fold.aot_specs()]
    assert len(names) == len(set(names))
    rows = _rows(stdout)
    for name in names:
        for variant in aot.VARIANTS:
            row = rows.get((name, variant))
            assert row is not None and row["status"].startswith("ok"), f"{name} {variant} missing or failed:\n{stdout}"
            assert int(row["shared"]) <= aot.SHARED_LIMITS[cap]
    assert f"{2 * len(names)}/{2 * len(names)} kernels ok" in stdout


@pytest.mark.aot
def test_aot_sm90_tensor_core_kernels_use_wgmma_without_spills(aot_reports):
    """Every 16-bit GEMM kernel and the TF32 variant use wgmma on sm_90 in both specialisations;
    the launched (aligned) log-prob kernels, 16-bit and TF32, do not spill registers."""
    code, stdout, _ = aot_reports[90]
    assert code == 0
    rows = _rows(stdout)
    gemm = [s[0] for s in logprobs_triton.aot_specs() if s[3]["DOT_PRECISION"] == "tf32"]
    assert any("tf32" in name for name in gemm) and any("bf16" in name for name in gemm)
    for name in gemm:
        for variant in aot.VARIANTS:
            mma = rows[(name, variant)]["mma"]
            assert mma.startswith("wgmma:"), f"{name} {variant}: {mma}"
            # 16-bit: every dot is a wgmma; TF32's gradient dots have MN-major operands, which
            # wgmma takes only for 16-bit types, so they may run as mma.sync
            kinds = {part.split(":")[0] for part in mma.split(",")}
            assert "tf32" in name or kinds == {"wgmma"}, f"{name} {variant}: {mma}"
        aligned = rows[(name, "aligned")]
        assert aligned["spill_st"] in ("0", "n/a") and aligned["spill_ld"] in ("0", "n/a"), f"{name} spills"
    ieee = [s[0] for s in logprobs_triton.aot_specs() if s[3]["DOT_PRECISION"] == "ieee"]
    assert ieee and all(rows[(name, "aligned")]["mma"] == "fma" for name in ieee)


def test_aot_mma_summary_and_divisibility_attrs():
    assert aot.mma_summary("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 ...\n"
                           "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16") == "wgmma:m64n128k16+m64n64k16"
    assert aot.mma_summary("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == "mma:m16n8k16"
    assert aot.mma_summary("fma.rn.f32 %f1, %f2, %f3, %f4;") == "fma"
    assert aot.mma_summary("wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32\n"
                           "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32") == "wgmma:m64n128k8,mma:m16n8k8"
    spec = next(s for s in logprobs_triton.aot_specs() if s[0] == "logprobs_bwd_bf16_bias0")
    fn, signature, constexprs = spec[1], spec[2], spec[3]
    full = aot._full_signature(fn, signature, constexprs)
    attrs = aot.divisibility_attrs(fn, full, spec[6])
    marked = {fn.arg_names[i] for (i,) in attrs}
    assert marked == {a for a in signature if signature[a].startswith("*")} | {"V", "H"}
    assert all(v == [["tt.divisibility", 16]] for v in attrs.values())


def test_aot_specs_cover_dtypes_and_bias():
    names = {spec[0] for spec in logprobs_triton.aot_specs()}
    for kind in ("fwd", "bwd"):
        for dt in ("bf16", "fp16", "fp32"):
            for bias in (0, 1):
                assert f"logprobs_{kind}_{dt}_bias{bias}" in names
    for name, fn, signature, constexprs, num_warps, num_stages, aligned_ints in logprobs_triton.aot_specs():
        assert set(signature) | set(constexprs) == set(fn.arg_names), name
        assert set(aligned_ints) <= {a for a, t in signature.items() if t == "i32"}, name
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
