"""AOT compile of every launched Triton kernel variant for sm_90 and sm_80 (no GPU needed).

`python -m drdo_kernels.aot` derives the variants from dry runs of the launchers and compiles
them; it runs once per session per architecture, in a subprocess without TRITON_INTERPRET
(under the interpreter @triton.jit returns an interpreter object that cannot be compiled).
The tests derive the variants again here, the same way, and check that each one was compiled,
within shared memory and without spills. Select with `-m aot`.
"""
import io
import os
import re
import subprocess
import sys

import pytest
import torch

from drdo_kernels import aot, logprobs_triton
from drdo_kernels.triton_runtime import triton_interpreting

pytestmark = pytest.mark.skipif(triton_interpreting(), reason="the Triton interpreter cannot compile kernels")


def _env_without_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH")) if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


_ROW = re.compile(r"^(?P<digest>[0-9a-f]{10})\s+(?P<kernel>\S+)\s+(?P<warps>\d+)\s+(?P<stages>\d+)\s+"
                  r"(?P<shared>\S+)\s+(?P<regs>\S+)\s+(?P<frame>\S+)\s+(?P<spills>\S+)\s+(?P<mma>\S+)\s+"
                  r"(?P<secs>\S+)\s+(?P<status>ok|FAILED: .*?)  (?P<summary>.*)$", re.MULTILINE)


@pytest.fixture(scope="session")
def aot_reports():
    """{capability: (returncode, stdout, stderr)} of `python -m drdo_kernels.aot` for sm_90 and
    sm_80, side by side in two subprocesses of one compile process each."""
    procs = {cap: subprocess.Popen([sys.executable, "-m", "drdo_kernels.aot", "--arch", f"sm_{cap}", "--jobs", "1"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=_env_without_interpreter())
             for cap in (90, 80)}
    return {cap: proc.communicate(timeout=1800) + (proc.returncode,) for cap, proc in procs.items()}


@pytest.fixture(scope="session")
def launched():
    """{capability: [Variant]} derived here, as the subprocesses derive them."""
    return {cap: aot.launched_variants(cap) for cap in (90, 80)}


def _rows(stdout):
    return {m["digest"]: m for m in _ROW.finditer(stdout)}


@pytest.mark.aot
@pytest.mark.parametrize("cap", [90, 80])
def test_every_launched_variant_is_compiled_without_spills(aot_reports, launched, cap):
    stdout, stderr, code = aot_reports[cap]
    assert code == 0, stdout[-6000:] + stderr[-3000:]
    rows = _rows(stdout)
    variants = launched[cap]
    assert len(rows) == len(variants), f"{len(rows)} rows for {len(variants)} launched variants"
    for variant in variants:
        row = rows.get(variant.digest)
        assert row is not None, f"launched variant not compiled: {variant.kernel} {variant.summary()}"
        assert row["status"] == "ok", row.group(0)
        assert int(row["shared"]) <= aot.SHARED_LIMITS[cap], row.group(0)
        assert row["spills"] == "0" and row["frame"] == "0", row.group(0)
    assert f"{len(variants)}/{len(variants)} variants ok" in stdout


@pytest.mark.aot
def test_sm90_tensor_core_variants_use_wgmma(aot_reports, launched):
    """16-bit products are wgmma, except the d_hidden product of a backward with BLOCK_K < 64 (its
    M is BLOCK_K; wgmma needs 64), which runs as mma.sync; TF32 starts with wgmma (its gradient
    products may run as mma.sync: wgmma takes MN-major operands only for 16-bit types); exact fp32
    uses CUDA cores."""
    stdout, _, code = aot_reports[90]
    assert code == 0
    rows = _rows(stdout)
    gemm = [v for v in launched[90] if v.kernel.startswith("logprobs")]
    assert gemm
    for v in gemm:
        mma = rows[v.digest]["mma"]
        consts = dict(v.constexprs)
        precision = consts[(v.fn.arg_names.index("DOT_PRECISION"),)]
        block_k = consts[(v.fn.arg_names.index("BLOCK_K"),)]
        sixteen_bit = any(t in ("*bf16", "*fp16") for _, t in v.signature)
        if sixteen_bit:
            assert mma.startswith("wgmma:"), f"{v.summary()}: {mma}"
            assert "mma:" not in mma.replace("wgmma:", "") or (v.kernel == "logprobs_bwd" and block_k < 64), mma
        elif precision == "tf32":
            assert mma.startswith("wgmma:"), f"{v.summary()}: {mma}"
        else:
            assert mma == "fma", f"{v.summary()}: {mma}"


def test_specialise_follows_the_jit_rule():
    """Integers: 1 -> constexpr, divisible by 16 -> tt.divisibility; pointers by address;
    do_not_specialize / do_not_specialize_on_alignment honoured."""
    from drdo_kernels import softmax_fold

    backend = aot._backend(90)
    x = torch.empty(4, 50257, device="meta")
    lab = torch.empty(8, dtype=torch.int64, device="meta")
    v = aot.specialise(softmax_fold._row_stats_kernel, backend,
                       (x, x[1:], lab[1:], x[0], x[0], x[0], 50257, 1, 1.0, 1.0),
                       dict(HAS_BIAS=True, TRANSFORM=0, ENTROPY=False, BLOCK=2048, num_warps=8))
    names = softmax_fold._row_stats_kernel.arg_names
    aligned = {names[k[0]] for k, attr in v.attrs if attr}
    assert aligned == {"x_ptr"}  # b_ptr: offset 50257 * 4 B; lab_ptr, ent_ptr: opted out; V odd
    assert dict(v.signature)["stride"] == "constexpr" and dict(v.constexprs)[(names.index("stride"),)] == 1
    v = aot.specialise(softmax_fold._row_stats_kernel, backend,
                       (x, x[0], lab, x[0], x[0], x[0], 128256, 128256, 1.0, 1.0),
                       dict(HAS_BIAS=True, TRANSFORM=0, ENTROPY=False, BLOCK=2048, num_warps=8))
    assert {names[k[0]] for k, attr in v.attrs if attr} == {"x_ptr", "b_ptr", "V", "stride"}
    assert v.num_warps == 8 and v.num_stages == 3  # the backend's default stages, as the JIT's


def test_launched_variants_cover_the_api_and_dedupe():
    """The dry run reaches every dtype pair, bias, transform, dot precision and the fold / pair
    kernels; one variant per specialisation key; the gradient subsets (frozen weight, hidden or
    bias) and the filter, runtime flags, add no backward variant."""
    variants = aot.launched_variants(90, vocab_sizes=(50257, 128256), hidden_sizes=(4096, 4100))
    assert len({v.key() for v in variants}) == len(variants)
    assert {v.kernel for v in variants} == {"logprobs_fwd", "logprobs_bwd", "row_stats", "softmax_grad", "drdo_pair"}
    bwd = [v for v in variants if v.kernel == "logprobs_bwd"]
    pointers = {(dict(v.signature)["h_ptr"], dict(v.signature)["w_ptr"]) for v in bwd}
    assert pointers == {("*fp32", "*fp32"), ("*bf16", "*bf16"), ("*fp16", "*fp16"), ("*bf16", "*fp32"),
                        ("*fp16", "*fp32")}
    words = {w for v in bwd for w in v.summary().split()}
    assert {"HAS_BIAS", "TRANSFORM=1", "TRANSFORM=2", "DOT_PRECISION=tf32", "DOT_PRECISION=ieee"} <= words
    # 6 dtype / precision settings x bias or not x 3 transforms x H divisible by 16 or not x entropy or not
    assert len(bwd) == 6 * 2 * 3 * 2 * 2
    assert {"ENTROPY" in v.summary().split() for v in bwd} == {True, False}
    assert all(dict(v.signature)[f] == "u1" for v in bwd for f in ("compute_dh", "compute_dw", "compute_db"))
    # V and the row count are not specialised in the log-prob kernels; H is
    assert {"D:H" in v.summary().split() for v in bwd} == {True, False}
    # the fold kernels specialise V (and the row stride) on divisibility: 50257 and 128256 differ
    folds = [v for v in variants if v.kernel == "softmax_grad"]
    assert {"D:V,x_stride,out_stride" in v.summary().split() for v in folds} == {True, False}
    assert {w for v in folds for w in v.summary().split()} >= {"IN_PLACE", "RAW", "out:bf16", "out:fp16"}


def test_aot_mma_summary_and_ptxas_log():
    assert aot.mma_summary("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 ...\n"
                           "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16") == "wgmma:m64n128k16+m64n64k16"
    assert aot.mma_summary("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == "mma:m16n8k16"
    assert aot.mma_summary("fma.rn.f32 %f1, %f2, %f3, %f4;") == "fma"
    log = ("ptxas info    : Function properties for k\n    8 bytes stack frame, 12 bytes spill stores, "
           "20 bytes spill loads\nptxas info    : Used 255 registers, used 1 barriers")
    assert aot.parse_ptxas_log(log) == (255, 8, 32)
    assert aot.parse_ptxas_log("nothing") == (None, None, None)


def test_aot_arch_parsing_and_interpreter_refusal(monkeypatch, capsys):
    assert aot.parse_arch("sm_90") == 90 and aot.parse_arch("80") == 80
    with pytest.raises(Exception, match="--arch"):
        aot.parse_arch("sm_75")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert aot.main(["--arch", "sm_90"]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err


def test_aot_reports_a_launcher_that_cannot_be_dry_run(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no dry run")

    monkeypatch.setattr(logprobs_triton, "logprobs_forward", broken)
    out = io.StringIO()
    assert aot.run(90, out=out) == 1
    assert "FAILED to derive the launched variants: RuntimeError: no dry run" in out.getvalue()
