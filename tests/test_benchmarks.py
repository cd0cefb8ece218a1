"""Smoke versions of the benchmarks (tiny shapes, seconds): CSV layout, skip reasons, finite numbers,
and that every method that runs computes what it claims (error against the float32 reference)."""
from __future__ import annotations

import argparse
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import bench_logprobs, bench_loss, bench_train, peers, work
from benchmarks.common import CSV_COLUMNS, PRESETS, build_grid, parse_shape, portable, read_csv
from benchmarks.measure import Inputs, _time, bench_times, run_backward, run_isolated

ROOT = Path(__file__).resolve().parent.parent

REQUIRED = ["method", "device", "dtype", "N", "H", "V", "mode", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb",
            "tflops", "status", "note"]
FAST = ["--device", "cpu", "--quick", "--no-isolate", "--min-run-time", "0.01", "--threads", "1", "--gemm-n", "128"]


def _finite(row: dict, key: str) -> float:
    value = float(row[key])
    assert math.isfinite(value), f"{row['method']} {row['mode']}: {key}={row[key]!r}"
    return value


def _check_rows(rows: list[dict], must_run: set[str]) -> None:
    assert rows, "no rows written"
    assert set(REQUIRED) <= set(rows[0]), f"missing columns {set(REQUIRED) - set(rows[0])}"
    ran = {r["method"] for r in rows if r["status"] == "ok"}
    assert must_run <= ran, f"expected {must_run} to run, ran {ran}; rows: {[(r['method'], r['note']) for r in rows]}"
    for r in rows:
        assert r["status"] in ("ok", "skipped", "oom", "error")
        if r["status"] == "ok":
            p20, med, p80 = (_finite(r, k) for k in ("p20_ms", "median_ms", "p80_ms"))
            assert 0 < p20 <= med <= p80
            assert _finite(r, "peak_mem_mb") > 0
            if float(r.get("work_nhv") or 1) > 0:  # a backward of gradients computed in the forward does no GEMM
                assert _finite(r, "tflops") > 0
        else:
            assert r["note"].strip(), f"{r['method']} is {r['status']} without a reason"


def test_logprobs_smoke(tmp_path: Path):
    out = bench_logprobs.main(FAST + ["--shapes", "32x16x300,64x16x300", "--output", str(tmp_path),
                                      "--methods", "ours_torch,naive,naive_compile,cce,torch_lce"])
    rows = read_csv(out / "logprobs.csv")
    _check_rows(rows, {"ours_torch", "naive"})
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    for r in rows:
        if r["status"] == "ok":
            assert float(r["max_abs_err"]) < 1e-3, r
    compiled = [r for r in rows if r["method"] == "naive_compile"]
    assert compiled and all(r["status"] == "skipped" and "--quick" in r["note"] for r in compiled)
    ratios = read_csv(out / "logprobs_ratios.csv")
    pair = [q for q in ratios if q["ours"] == "ours_torch" and q["peer"] == "naive"]
    assert len(pair) == 6 and all(float(q["time_ratio"]) > 0 and float(q["mem_ratio"]) > 0 for q in pair)
    assert list((out).glob("logprobs_fp32_*.png")), "no plot of time/memory vs N"
    assert "ours_torch" in (out / "results.md").read_text()


def test_loss_smoke_checks_every_peer_against_its_reference(tmp_path: Path):
    out = bench_loss.main(FAST + ["--shapes", "64x16x256", "--seq-len", "16", "--output", str(tmp_path),
                                  "--methods", "ours_torch,naive,liger_dpo,cce,torch_lce", "--no-plots"])
    rows = read_csv(out / "loss.csv")
    liger_missing = peers.import_reason("liger_kernel.chunked_loss", "liger-kernel")
    _check_rows(rows, {"ours_torch", "naive"} | (set() if liger_missing else {"liger_dpo"}))
    if liger_missing:  # CI without the [bench] extra: the peer is listed with the install line
        assert all("pip install liger-kernel" in r["note"] for r in rows if r["method"] == "liger_dpo")
    for r in rows:
        if r["status"] == "ok":  # liger_dpo is checked against drdo.losses.dpo_loss, the rest against drdo_loss
            assert float(r["max_abs_err"]) < 1e-4, r
    assert [c for c in CSV_COLUMNS if c not in rows[0]] == []


def test_isolated_worker_measures_peak_rss():
    ctx = dict(device="cpu", N=64, H=16, V=4096, dtype="fp32", modes=["fwd+bwd"], quick=True, seed=0,
               ignore_frac=0.25, min_run_time=0.01, interpret=False, threads=1, seq_len=None)
    rows, failure = run_isolated("benchmarks.measure:measure_point_payload",
                                 {"bench": "benchmarks.bench_logprobs", "method": "naive", "ctx": ctx}, timeout=120)
    assert failure == "" and rows[0]["status"] == "ok", (failure, rows)
    logits_mb = 64 * 4096 * 4 / 2**20  # the naive path holds fp32 logits [N, V] at least once
    assert rows[0]["peak_mem_mb"] >= logits_mb


def test_triton_backend_is_skipped_with_reason_on_cpu_without_interpreter():
    reason = peers.ours_reason(dict(device="cpu", interpret=False), "triton")
    assert reason and "TRITON_INTERPRET" in reason
    assert peers.import_reason("no_such_module_xyz", "no-such-pkg").endswith("pip install no-such-pkg")


def test_train_smoke_and_max_batch(tmp_path: Path):
    out = bench_train.main(["--device", "cpu", "--quick", "--no-isolate", "--V", "512", "--H", "32", "--heads", "2",
                            "--T", "16", "--B", "1", "--threads", "1", "--min-run-time", "0.01",
                            "--methods", "ours_torch,naive,trl_dpo_fused,trl_dpo_liger",
                            "--output", str(tmp_path)])
    rows = read_csv(out / "train.csv")
    _check_rows([dict(r, tflops="1") for r in rows], {"ours_torch", "naive"})  # no FLOP count for a step
    assert all(float(r["tokens_per_s"]) > 0 for r in rows if r["status"] == "ok")
    liger = [r for r in rows if r["method"] == "trl_dpo_liger"]
    assert liger[0]["status"] == "skipped" and "CUDA" in liger[0]["note"]
    fused = [r for r in rows if r["method"] == "trl_dpo_fused"][0]
    assert fused["status"] == ("skipped" if peers.trl_kernels_reason() else "ok"), fused
    ctx = dict(method="naive", device="cpu", dtype="fp32", V=256, H=32, layers=1, heads=2, T=16, seed=0,
               quick=True, threads=1, min_run_time=0.01, interpret=False)
    found = bench_train.max_batch(ctx, budget_mb=1e6, limit=2, isolate=False, timeout=60)
    assert found["status"] == "ok" and found["max_batch_pairs"] == 2
    none_fits = bench_train.max_batch(ctx, budget_mb=1e-3, limit=2, isolate=False, timeout=60)
    assert none_fits["max_batch_pairs"] == 0 and none_fits["next_batch_pairs"] == 1


def test_grid_and_shapes():
    assert parse_shape("llama-3-8b:16384", 1) == (16384, *PRESETS["llama-3-8b"])
    assert parse_shape("4x5x6", 1) == (4, 5, 6)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_shape("4x5", 1)

    class Args:
        quick, base, dtypes, shapes, sweep, N, H, V, preset = False, None, None, None, None, None, None, None, None
        modes = ["fwd"]

    points = build_grid(Args, "cuda")
    assert {p.N for p in points} >= {1024, 32768} and {p.V for p in points} >= {32000, 256000}
    assert {p.H for p in points} >= {896, 4096} and {p.dtype for p in points} == {"bf16", "fp32"}


def test_gpu_suite_script_is_offline_and_valid_bash():
    script = ROOT / "benchmarks" / "gpu_suite.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "--no-index" in text and "pip download" not in text
    for needed in ("bench_loss.py", "bench_logprobs.py", "bench_train.py", "16384x4096x128256", "bench_padding_free.py",
                   "profile_loss.py", "paired.py", "base_chunked", "ours_auto", "trl_chunked", "BASELINE", "timeout",
                   "TRITON_INTERPRET=0", "flash-attn: skipped"):
        assert needed in text


def test_paired_timing_smoke(tmp_path: Path):
    from benchmarks import paired

    path = paired.main(["--bench", "logprobs", "--shapes", "32x16x300", "--methods", "ours_torch,naive,cce",
                        "--rounds", "3", "--threads", "1", "--output", str(tmp_path)])
    rows = {r["peer"]: r for r in read_csv(path)}
    naive = rows["naive"]
    assert 0 < float(naive["ratio_p20"]) <= float(naive["ratio_median"]) <= float(naive["ratio_p80"])
    if rows["cce"]["rounds"] == "0":  # no GPU (CCE's default impl is Triton): listed with the exception
        assert rows["cce"]["note"].startswith("skipped:")


def test_new_methods_are_listed():
    for bench in (bench_logprobs, bench_loss):
        assert {"ours_chunked", "trl_chunked", "base_triton", "base_torch"} <= set(bench.METHODS)
        assert bench.METHODS["base_torch"].baseline and not bench.METHODS["ours_torch"].baseline
    assert {"ours_chunked", "trl_dpo_fused", "trl_dpo", "trl_dpo_liger"} <= set(bench_train.METHODS)
    reason = peers.baseline_reason(dict(device="cpu"), "torch")
    assert reason and "--baseline" in reason


def _named_methods(script: str) -> set[str]:
    """The method names a shell script passes (``--methods a,b`` and ``*METHODS=a,b``)."""
    import re

    found = re.findall(r"(?:--methods\s+\"?|METHODS=)([a-z_0-9,]+)", script)
    return {name for group in found for name in group.split(",") if name}


def test_every_method_is_named_once_in_the_registry():
    """The benchmarks, the work model, the analytic model, the scripts and the README use the
    registry's names, and each benchmark runs exactly the registry's methods for it."""
    from benchmarks import methods, model, trl_train

    for bench, module in (("logprobs", bench_logprobs), ("loss", bench_loss)):
        assert tuple(module.METHODS) == methods.names(bench)
        assert all(m.name == name and m.kind == methods.family(name) for name, m in module.METHODS.items())
        assert set(work.WORK[bench]) == set(methods.names(bench))
        assert {m.name for m in model.methods(bench, 1024, 64, 1000, 256)} <= set(methods.REGISTRY)
    assert sorted(bench_train.METHODS) == sorted(methods.names("train"))
    assert set(trl_train.METHODS) <= set(methods.names("train"))
    for script in ("gpu_suite.sh", "run_cpu.sh"):
        named = _named_methods((ROOT / "benchmarks" / script).read_text())
        assert named <= set(methods.REGISTRY), f"{script} names unregistered methods {named - set(methods.REGISTRY)}"
    readme = (ROOT / "benchmarks" / "README.md").read_text().split("## Methods", 1)[1].split("\n## ", 1)[0]
    listed = [line.split("|")[1].strip().strip("`") for line in readme.splitlines() if line.startswith("| `")]
    assert sorted(listed) == sorted(methods.REGISTRY), "benchmarks/README.md's Methods table: one row per method"
    assert {"ours_auto", "ours_chunked", "ours_torch", "ours_triton", "naive", "torch_lce", "liger_flce",
            "liger_flce_cutedsl", "cce", "trl_chunked", "trl_logprob_entropy"} <= set(methods.REGISTRY)
    with pytest.raises(ValueError, match="'nope'"):
        methods.spec_of("nope")


@pytest.mark.skipif(peers.trl_kernels_reason() is not None, reason="trl >= 1.16 not installed")
def test_trl_heads_match_the_float64_log_softmax():
    import torch

    from benchmarks.trl_train import FullLogitsHead

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=gen, dtype=torch.float64)
    w = torch.randn(300, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 300, (37,), generator=gen)
    y[::3] = -100
    expected = torch.log_softmax(h @ w.T, -1).gather(-1, y.clamp(min=0)[:, None])[:, 0].masked_fill(y == -100, 0)
    got = peers.trl_logprobs(h.float(), w.float(), y)
    assert (got.double() - expected).abs().max() < 1e-4
    full = FullLogitsHead.apply(h.float()[y != -100], w.float(), None, y[y != -100], 1.0, 0, None, 1.0, ("entropy",))
    assert (full[0].double() - expected[y != -100]).abs().max() < 1e-4 and full[1] is not None and full[2] is None


def test_baseline_kernels_come_from_the_given_checkout(tmp_path: Path):
    import shutil

    root = Path(__file__).resolve().parent.parent
    base = tmp_path / "base"
    for pkg in ("drdo", "drdo_kernels"):
        shutil.copytree(root / pkg, base / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = bench_loss.main(FAST + ["--shapes", "64x16x256", "--seq-len", "16", "--output", str(tmp_path / "out"),
                                  "--methods", "ours_torch,base_torch", "--no-plots", "--baseline", str(base)])
    rows = {r["method"]: r for r in read_csv(out / "loss.csv")}
    assert rows["base_torch"]["status"] == "ok", rows["base_torch"]
    assert "checkout base" in rows["base_torch"]["note"] and float(rows["base_torch"]["max_abs_err"]) < 1e-4
    assert str(tmp_path) not in (out / "loss.csv").read_text() + (out / "loss_meta.json").read_text()


def test_model_arithmetic_by_hand():
    from benchmarks import model

    n, h, v = 16384, 4096, 128256
    by_name = {m.name: m for m in model.methods("loss", n, h, v, 1024)}
    assert set(by_name) >= {"naive", "naive_compile", "cce", "liger_dpo", "ours_triton", "ours_chunked", "ours_auto",
                            "trl_chunked"}
    nhv = n * h * v
    gpu = model.GPUS["h200"]
    # CCE by hand: forward 2NHV at 699 TFLOP/s; backward 128 x 1002 tiles of (128 + 128) x 4096 atomics
    fwd_s = 2 * nhv / 699e12
    atomics = 128 * 1002 * 256 * 4096
    assert by_name["cce"].total("atomics") == atomics
    assert math.isclose(by_name["cce"].seconds(gpu.flops, gpu.hbm), fwd_s + atomics / model.ATOMICS, rel_tol=1e-9)
    # naive: 6NHV, 12 bytes per logit of extra memory (fp32 log-probs, their gradient, the gather's zeros)
    assert math.isclose(by_name["naive"].total("flops"), 6 * nhv)
    assert by_name["naive"].extra_bytes == 12 * n * v
    assert model.GPUS["h100"].hbm == 3.35e12 and model.GPUS["h200"].hbm == 4.8e12 and gpu.flops == 699e12
    text = model.table("loss", n, h, v)
    assert "Modelled, not measured" in text and "| cce |" in text and "H200" in text


@pytest.mark.parametrize("bench_name", ["loss", "logprobs"])
@pytest.mark.parametrize("shape", [(16384, 4096, 128256, 1024), (16384, 1024, 128256, 512), (4096, 2048, 32000, 64)])
def test_model_does_the_work_of_the_work_table(bench_name, shape):
    """Every modelled method's FLOPs are those of benchmarks.work, the table TFLOP/s are computed from."""
    from benchmarks import model

    n, h, v, t = shape
    ctx = dict(device="cuda", dtype="bf16", N=n, H=h, V=v, seq_len=t)
    for m in model.methods(bench_name, n, h, v, t):
        assert math.isclose(m.total("flops") / (n * h * v), work.nhv(bench_name, m.name, "fwd+bwd", ctx)[0],
                            rel_tol=1e-9), m.name


def test_model_takes_its_chunks_from_the_kernels(monkeypatch):
    """The chunk size is the kernels' chunk_rows: change the budget and the model follows."""
    from benchmarks import model
    from drdo_kernels import logprobs_chunked

    def chunked(bench):
        return next(m for m in model.methods(bench, 16384, 4096, 128256, 1024) if m.name == "ours_chunked")

    rows = logprobs_chunked.chunk_rows(128256, torch.bfloat16, torch.device("cuda"))
    assert f"of {rows} tokens" in chunked("logprobs").what
    monkeypatch.setitem(logprobs_chunked.CHUNK_BUDGET_BYTES, "cuda", 3 << 30)  # 4185 rows: two pairs of 2048 a chunk
    assert "of 4096 tokens (whole pairs), grads in forward" in chunked("loss").what
    assert math.isclose(chunked("loss").total("flops"), 6 * 16384 * 4096 * 128256)


def test_model_beside_measured_results(tmp_path: Path):
    rows = [dict(bench="loss", method=m, device="cuda", dtype="bf16", N=16384, H=4096, V=128256, mode="fwd+bwd",
                 median_ms=ms, status="ok", seq_len=1024) for m, ms in (("ours_chunked", 83.0), ("base_triton", 531.3))]
    from benchmarks.common import write_csv

    write_csv(rows, tmp_path / "loss.csv")
    (tmp_path / "loss_meta.json").write_text(json.dumps({"gpu": "NVIDIA H200"}))
    from benchmarks import model

    text = model.main(["--results", str(tmp_path)])
    assert "H200 constants" in text and "| loss | ours_chunked | 16384 | 4096 | 128256 | 83.0 |" in text
    assert "| base_triton | 16384 | 4096 | 128256 | 531.3 | not modelled |" in text


class _GemmFlops(TorchDispatchMode):
    """Counts the FLOPs of every matrix product dispatched (mm, addmm, in place or into out=)."""

    OPS = {"mm", "addmm", "addmm_", "bmm", "baddbmm"}

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.OPS:
            a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
            self.flops += 2 * math.prod(a.shape) * b.shape[-1]
        return func(*args, **(kwargs or {}))


def _counted_work(bench, method: str, ctx: dict) -> tuple[float, float]:
    """(forward, backward) GEMM FLOPs of one call of ``method``, in units of N·H·V."""
    inputs = bench.make_inputs(ctx)
    fn = bench.METHODS[method].build(inputs, ctx)
    with _GemmFlops() as fwd:
        out = fn()
    with _GemmFlops() as bwd:
        run_backward(out, inputs)
    nhv = ctx["N"] * ctx["H"] * ctx["V"]
    return fwd.flops / nhv, bwd.flops / nhv


_CPU = dict(device="cpu", dtype="fp32", seed=0, H=16, V=32768, ignore_frac=0.0, quick=True, interpret=False,
            logits="std2", margins="close", filter_eps=0.0)


@pytest.mark.parametrize("seq_len, pairs_fit", [(32, True), (128, False)])  # chunks of 128 tokens at V=32768
def test_work_table_matches_the_gemms_each_loss_runs(seq_len, pairs_fit, monkeypatch):
    """The work model counts the GEMMs the code runs: our pair losses 6 NHV in the forward when a pair fits a
    chunk, 8 NHV (two passes) when it does not; naive 2 + 4; TRL's fused head 2 + 6."""
    from drdo_kernels import logprobs_chunked

    monkeypatch.setitem(logprobs_chunked.CHUNK_BUDGET_BYTES, "cpu", 16 << 20)  # 128 rows of V=32768 fp32
    ctx = dict(_CPU, N=4 * seq_len, seq_len=seq_len)
    assert work.chunk_tokens(ctx) == 128
    assert work.pair_path(ctx) == ("grads_in_forward" if pairs_fit else "two_pass_in_forward")
    methods = ["ours_chunked", "ours_torch", "ours_auto", "naive"]
    methods += [] if peers.trl_kernels_reason() else ["trl_chunked"]
    for method in methods:
        path = work.path("loss", method, ctx)
        assert _counted_work(bench_loss, method, ctx) == pytest.approx(work.PATHS[path]), (method, path)


def test_work_table_matches_the_gemms_of_plain_logprobs():
    ctx = dict(_CPU, N=300, V=4096)
    methods = ["ours_chunked", "ours_torch", "ours_auto", "naive"]
    methods += [] if peers.trl_kernels_reason() else ["trl_chunked"]
    for method in methods:
        path = work.path("logprobs", method, ctx)
        assert _counted_work(bench_logprobs, method, ctx) == pytest.approx(work.PATHS[path]), (method, path)
    if peers.torch_lce_reason() is None:  # its forward is one fused op (not counted here); its backward recomputes
        assert work.path("logprobs", "torch_lce", ctx) == "recompute"
        assert _counted_work(bench_logprobs, "torch_lce", ctx)[1] == pytest.approx(6)


def test_work_table_covers_every_method():
    assert set(work.WORK["loss"]) == set(bench_loss.METHODS)
    assert set(work.WORK["logprobs"]) == set(bench_logprobs.METHODS)
    assert {work.PATHS[p][0] + work.PATHS[p][1] for p in work.PATHS} == {6, 8}
    headline = dict(device="cuda", dtype="bf16", N=16384, H=4096, V=128256, seq_len=1024)
    assert work.nhv("loss", "liger_dpo", "fwd+bwd", headline) == (6, "grads_in_forward")
    assert work.nhv("loss", "naive_compile", "fwd+bwd", headline) == (6, "full_logits")
    assert work.nhv("logprobs", "trl_chunked", "bwd", headline) == (6, "recompute")


@pytest.mark.parametrize("regime", ["std2", "init", "peaked"])
def test_logit_regimes_have_the_requested_statistics(regime):
    from benchmarks.heads import logit_stats, make_head_tensors

    ctx = dict(device="cpu", dtype="bf16", seed=0, N=512, H=256, V=8192, logits=regime)
    stats = logit_stats(*make_head_tensors(ctx, (512,)))
    if regime == "peaked":  # a few tokens dominate: a large top-1 probability, a low entropy, likely labels
        assert stats["top1_prob"] > 0.3 and stats["entropy"] < 3.5 and stats["label_prob"] > 0.1, stats
    else:
        assert stats["logit_std"] == pytest.approx({"std2": 2.0, "init": 0.6}[regime], rel=0.05), stats
        assert stats["top1_prob"] < 0.1 and stats["label_prob"] < 0.01, stats


@pytest.mark.parametrize("margins", ["close", "independent"])
def test_pair_margins_decide_the_rows_with_zero_upstream_gradient(margins):
    ctx = dict(device="cpu", dtype="bf16", seed=0, N=32768, H=32, V=2048, seq_len=512, logits="std2", margins=margins)
    stats = bench_loss.input_stats(ctx)
    assert stats["margins"] == margins and stats["seq_len"] == 512
    if margins == "close":
        assert stats["zero_grad_rows"] == 0
    else:  # |z_w - z_l| in the hundreds: the focal factor underflows for some pairs
        assert stats["zero_grad_rows"] > 0.05


def test_loss_rows_record_regime_work_and_input_statistics(tmp_path: Path):
    out = bench_loss.main(FAST + ["--shapes", "64x16x256", "--seq-len", "16", "--output", str(tmp_path), "--no-plots",
                                  "--methods", "ours_auto,naive", "--logits", "peaked", "--reps", "4"])
    rows = {r["method"]: r for r in read_csv(out / "loss.csv")}
    for r in rows.values():
        assert (r["logits"], r["margins"], r["filter_eps"], r["work_nhv"]) == ("peaked", "close", "0", "6"), r
        assert float(r["zero_grad_rows"]) == 0 and int(r["n_samples"]) >= 4
    meta = json.loads((out / "loss_meta.json").read_text())
    assert (meta["logits"], meta["margins"], meta["reps"]) == ("peaked", "close", 4)
    assert "`peaked`" in (out / "loss.md").read_text()


def test_filter_eps_reaches_the_triton_backend_only_where_it_can(tmp_path: Path):
    out = bench_loss.main(FAST + ["--shapes", "64x16x256", "--seq-len", "16", "--output", str(tmp_path), "--no-plots",
                                  "--methods", "ours_chunked,ours_triton,ours_auto", "--filter-eps", "0.000244140625"])
    rows = {r["method"]: r for r in read_csv(out / "loss.csv")}
    assert rows["ours_chunked"]["status"] == "ok"
    assert rows["ours_auto"]["status"] == "skipped" and "filter_eps" in rows["ours_auto"]["note"]


def test_append_keeps_earlier_points(tmp_path: Path):
    args = FAST + ["--seq-len", "16", "--output", str(tmp_path), "--no-plots", "--methods", "naive"]
    bench_loss.main(args + ["--shapes", "64x16x256"])
    out = bench_loss.main(args + ["--shapes", "64x32x256", "--append"])
    assert {r["H"] for r in read_csv(out / "loss.csv")} == {"16", "32"}
    assert len(json.loads((out / "loss_meta.json").read_text())["commands"]) == 2


def test_cpu_timing_takes_the_requested_repetitions():
    assert bench_times(lambda: None, "cpu", 0.0, reps=20)[3] >= 20


class _FreesWhatItSaved(torch.autograd.Function):
    """A backward that hands out the gradient stored in the forward and drops it: it runs once."""

    @staticmethod
    def forward(ctx, x):
        ctx.grad = 2 * x.detach()
        return (x * x).sum()

    @staticmethod
    def backward(ctx, upstream):
        if ctx.grad is None:
            raise RuntimeError("Trying to backward through the graph a second time")
        grad, ctx.grad = ctx.grad, None
        return upstream * grad


def test_bwd_is_derived_where_a_backward_cannot_be_repeated():
    x = torch.randn(8, requires_grad=True)
    inputs = Inputs(tensors={"x": x}, grad=[x])
    *times, note = _time("bwd", lambda: _FreesWhatItSaved.apply(x), inputs, "cpu", 0.0, 3)
    assert note.startswith("derived as (fwd+bwd) - fwd: repeated backward unsupported"), note
    assert times[3] >= 3
    *times, note = _time("bwd", lambda: (x * x).sum(), inputs, "cpu", 0.0, 3)
    assert note == "backward replayed with retain_graph=True" and times[3] >= 3


def test_portable_paths():
    assert portable("--baseline /work/x/.baseline --output /tmp/tmp.AB12/gpu") == "--baseline .baseline --output gpu"
    assert portable(f"{ROOT}/benchmarks/bench_loss.py") == "benchmarks/bench_loss.py"
    assert portable("/opt/venv/lib/python3.12/site-packages/trl/trainer/utils.py") == "trl/trainer/utils.py"
    for kept in ("TFLOP/s, ours/peer, 1/2", "https://github.com/pypa/setuptools/issues/917", "a / b"):
        assert portable(kept) == kept


def test_committed_results_hold_no_machine_paths():
    for path in sorted((ROOT / "benchmarks" / "results").rglob("*")):
        if path.suffix in (".csv", ".md", ".json", ".log"):
            text = path.read_text(encoding="utf-8")
            assert portable(text) == text, f"{path.relative_to(ROOT)} names a machine path"


def test_cce_gets_two_dimensional_hidden_states(monkeypatch):
    """bench_train's CCE row: CCE views its input flat, so it is given [2B*T, H] hidden states."""
    import sys
    import types

    def linear_cross_entropy(h, w, y, ignore_index, reduction, impl):
        assert h.dim() == 2 and y.dim() == 1 and h.shape[0] == y.shape[0]
        nll = torch.nn.functional.cross_entropy(h @ w.T, y, ignore_index=ignore_index, reduction="none")
        return nll

    monkeypatch.setitem(sys.modules, "cut_cross_entropy",
                        types.SimpleNamespace(linear_cross_entropy=linear_cross_entropy))
    lm = types.SimpleNamespace(lm_head=torch.nn.Linear(8, 50, bias=False))
    loss_fn = bench_train._loss_fn("cce", dict(device="cpu"), lm, None)
    hidden = torch.randn(4, 6, 8).transpose(0, 1).transpose(0, 1)  # strided like a model's output slice
    labels = torch.randint(0, 50, (4, 6))
    loss = loss_fn(hidden, labels, torch.randn(4), torch.randn(4, requires_grad=True))
    assert loss.dim() == 0 and torch.isfinite(loss)


@pytest.mark.skipif(peers.import_reason("trl.trainer.dpo_trainer", "trl") is not None, reason="trl not installed")
def test_trl_trainer_hashes_no_weights():
    import trl.trainer.dpo_trainer as dpo_trainer

    from benchmarks.trl_train import unhashed_reference_cache

    saved = dpo_trainer.hash_module
    with unhashed_reference_cache():
        keys = {dpo_trainer.hash_module(torch.nn.Linear(2, 2)) for _ in range(2)}
    assert len(keys) == 2 and dpo_trainer.hash_module is saved


CPU_RUN = ROOT / "benchmarks" / "results" / "2026-12-06-cpu"


def test_docs_cpu_table_is_generated_from_the_committed_csv():
    """docs/kernels.md's CPU table is what benchmarks.docs_table makes of the committed run, and in that
    run ours_auto is the fastest of ours, naive full logits and torch's linear_cross_entropy, paired too."""
    from benchmarks import docs_table

    text = docs_table.DOC.read_text(encoding="utf-8")
    assert docs_table.render(text, CPU_RUN) == text, "run: python -m benchmarks.docs_table " + str(CPU_RUN)
    rows = {r["method"]: r for r in read_csv(CPU_RUN / "loss.csv") if r["status"] == "ok"}
    auto = float(rows["ours_auto"]["median_ms"])
    assert auto < float(rows["naive"]["median_ms"]) and auto < float(rows["torch_lce"]["median_ms"])
    assert float(rows["ours_auto"]["peak_mem_mb"]) < float(rows["naive"]["peak_mem_mb"])
    for path in (CPU_RUN / "paired_loss.csv", CPU_RUN / "found_case" / "paired_loss.csv"):
        paired = {r["peer"]: r for r in read_csv(path)}
        for peer in ("naive", "torch_lce"):
            assert float(paired[peer]["ratio_median"]) < 1 and int(paired[peer]["rounds"]) >= 5, (path, peer)


def test_docs_table_lists_every_method_with_its_status(tmp_path: Path):
    from benchmarks import docs_table
    from benchmarks.common import write_csv

    base = dict(bench="loss", device="cpu", dtype="fp32", N=64, H=8, V=100, mode="fwd+bwd", note="")
    write_csv([dict(base, method="naive", median_ms=2000.0, peak_mem_mb=50.0, status="ok"),
               dict(base, method="ours_auto", median_ms=1500.0, peak_mem_mb=10.0, status="ok"),
               dict(base, method="cce", status="skipped", note="first call raised RuntimeError: no | driver")],
              tmp_path / "loss.csv")
    table = docs_table.table(tmp_path).splitlines()
    assert table[2] == "| `ours_auto` | 1.50 s | 0.75× | 10 MB | – |"
    assert table[3] == "| `naive` | 2.00 s | 1.00× | 50 MB | – |"
    assert table[4].startswith("| `cce` | skipped: first call raised RuntimeError: no / driver |")
    with pytest.raises(ValueError, match="no <!-- cpu-loss-table -->"):
        docs_table.render("no markers", tmp_path)


def test_append_replaces_a_method_measured_again(tmp_path: Path):
    """--append keeps the other methods' rows and replaces those of a method measured again at a point."""
    args = FAST + ["--shapes", "64x16x256", "--seq-len", "16", "--no-plots", "--output", str(tmp_path)]
    bench_loss.main(args + ["--methods", "ours_torch,naive"])
    bench_loss.main(args + ["--methods", "naive", "--append"])
    rows = read_csv(tmp_path / "loss.csv")
    assert sorted(r["method"] for r in rows) == ["naive", "ours_torch"]
