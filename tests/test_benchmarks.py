"""Smoke versions of the benchmarks (tiny shapes, seconds): CSV layout, skip reasons, finite numbers,
and that every method that runs computes what it claims (error against the float32 reference)."""
from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest

from benchmarks import bench_logprobs, bench_loss, bench_train, peers
from benchmarks.common import CSV_COLUMNS, PRESETS, build_grid, parse_shape, read_csv
from benchmarks.measure import run_isolated

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
                            "--methods", "ours_torch,full_logits,trl_dpo_fused,trl_dpo_liger", "--output", str(tmp_path)])
    rows = read_csv(out / "train.csv")
    _check_rows([dict(r, tflops="1") for r in rows], {"ours_torch", "full_logits"})  # no FLOP count for a step
    assert all(float(r["tokens_per_s"]) > 0 for r in rows if r["status"] == "ok")
    liger = [r for r in rows if r["method"] == "trl_dpo_liger"]
    assert liger[0]["status"] == "skipped" and "CUDA" in liger[0]["note"]
    fused = [r for r in rows if r["method"] == "trl_dpo_fused"][0]
    assert fused["status"] == ("skipped" if peers.trl_kernels_reason() else "ok"), fused
    ctx = dict(method="full_logits", device="cpu", dtype="fp32", V=256, H=32, layers=1, heads=2, T=16, seed=0,
               quick=True, threads=1, min_run_time=0.01, interpret=False)
    found = bench_train.max_batch(ctx, budget_mb=1e6, limit=2, isolate=False, timeout=60)
    assert found["status"] == "ok" and found["max_batch_pairs"] == 2
    none_fits = bench_train.max_batch(ctx, budget_mb=1e-3, limit=2, isolate=False, timeout=60)
    assert none_fits["max_batch_pairs"] == 0 and none_fits["next_batch_pairs"] == 1


def test_grid_and_shapes():
    assert parse_shape("llama-3-8b:16384", 1) == (16384, *PRESETS["llama-3-8b"])
    assert parse_shape("4x5x6", 1) == (4, 5, 6)
    with pytest.raises(Exception):
        parse_shape("4x5", 1)

    class Args:
        quick, base, dtypes, shapes, sweep, N, H, V, preset = False, None, None, None, None, None, None, None, None
        modes = ["fwd"]

    points = build_grid(Args, "cuda")
    assert {p.N for p in points} >= {1024, 32768} and {p.V for p in points} >= {32000, 256000}
    assert {p.H for p in points} >= {896, 4096} and {p.dtype for p in points} == {"bf16", "fp32"}


def test_gpu_suite_script_is_offline_and_valid_bash():
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_suite.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "--no-index" in text and "pip download" not in text
    for bench in ("bench_loss.py", "bench_logprobs.py", "bench_train.py", "16384x4096x128256", "bench_padding_free.py",
                  "base_triton", "ours_chunked", "trl_chunked", "BASELINE", "timeout"):
        assert bench in text


def test_paired_timing_smoke(tmp_path: Path):
    from benchmarks import paired

    path = paired.main(["--bench", "logprobs", "--shapes", "32x16x300", "--methods", "ours_torch,naive,cce",
                        "--rounds", "3", "--threads", "1", "--output", str(tmp_path)])
    rows = {r["peer"]: r for r in read_csv(path)}
    assert 0 < float(rows["naive"]["ratio_p20"]) <= float(rows["naive"]["ratio_median"]) <= float(rows["naive"]["ratio_p80"])
    if rows["cce"]["rounds"] == "0":  # no GPU (CCE's default impl is Triton): listed with the exception
        assert rows["cce"]["note"].startswith("skipped:")


def test_new_methods_are_listed():
    for bench in (bench_logprobs, bench_loss):
        assert {"ours_chunked", "trl_chunked", "base_triton", "base_torch"} <= set(bench.METHODS)
        assert bench.METHODS["base_torch"].baseline and not bench.METHODS["ours_torch"].baseline
    assert {"ours_chunked", "trl_dpo_fused", "trl_dpo", "trl_dpo_liger"} <= set(bench_train.METHODS)
    reason = peers.baseline_reason(dict(device="cpu"), "torch")
    assert reason and "--baseline" in reason


@pytest.mark.skipif(peers.trl_kernels_reason() is not None, reason="trl >= 1.16 not installed")
def test_trl_heads_match_the_float64_log_softmax():
    import torch

    from benchmarks.trl_train import FullLogitsHead

    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(37, 16, generator=gen, dtype=torch.float64), torch.randn(300, 16, generator=gen, dtype=torch.float64)
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
    assert str(base) in rows["base_torch"]["note"] and float(rows["base_torch"]["max_abs_err"]) < 1e-4


def test_model_arithmetic_by_hand():
    from benchmarks import model

    n, h, v = 16384, 4096, 128256
    by_name = {b.name: b for b in model.backends(n, h, v)}
    assert set(by_name) >= {"naive", "cce", "liger_flce", "liger_dpo", "ours_triton_old", "ours_triton_new",
                            "ours_chunked", "ours_torch_old", "trl_chunked"}
    nhv = n * h * v
    # CCE by hand: forward 2NHV at 705 TFLOP/s; backward 128 x 1002 tiles of (128 + 128) x 4096 atomics at 5e11/s
    fwd_s = 2 * nhv / 705e12
    atomics = 128 * 1002 * 256 * 4096
    assert by_name["cce"].total("atomics") == atomics
    assert math.isclose(by_name["cce"].seconds(705e12), fwd_s + atomics / 5e11, rel_tol=1e-9)
    assert math.isclose(fwd_s * 1e3 + atomics / 5e11 * 1e3, 293.4, abs_tol=0.1)
    # naive: 6NHV, 12 bytes per logit of extra memory (fp32 log-probs, their gradient, the gather's zeros)
    assert math.isclose(by_name["naive"].total("flops"), 6 * nhv)
    assert by_name["naive"].extra_bytes == 12 * n * v
    assert math.isclose(by_name["ours_chunked"].total("flops"), 6 * nhv)
    assert math.isclose(by_name["ours_triton_old"].total("flops"), 8 * nhv)
    text = model.table(n, h, v)
    assert "Modelled, not measured" in text and "| cce |" in text and "313.2" in text
