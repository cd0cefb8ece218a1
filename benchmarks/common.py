"""Shared command line, shape grids and CSV layout of the LM-head benchmarks.

A benchmark point is one LM-head shape: N tokens, hidden size H, vocabulary V and
the dtype of hidden/weight. ``build_grid`` turns the command line into the list of
points; ``CSV_COLUMNS`` is the layout every benchmark CSV uses.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from drdo.atomic import atomic_write

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # scripts run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

#: (hidden size, vocabulary size) of real LM heads.
PRESETS = {
    "qwen2.5-0.5b": (896, 151936),
    "llama-3-8b": (4096, 128256),
    "gemma-2-2b": (2304, 256000),
}

MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = ("bf16", "fp32")

CSV_COLUMNS = [
    "bench", "method", "device", "dtype", "N", "H", "V", "mode",
    "median_ms", "p20_ms", "p80_ms", "n_samples", "peak_mem_mb",
    "tflops", "peak_frac", "gemm_tflops", "work_nhv", "work_path", "max_abs_err", "status", "note",
    "logits", "margins", "filter_eps",
]

#: Timed repetitions per point unless --reps says otherwise.
DEFAULT_REPS = 20

#: Defaults of the sweeps: base point and the values each sweep walks through.
#: CPU sizes are small because a 2-core CPU does ~0.08 TFLOP/s in fp32.
SWEEPS = {
    "cuda": dict(base=(8192, 4096, 128256), N=[1024, 2048, 4096, 8192, 16384, 32768],
                 V=[32000, 128256, 256000], H=[896, 2048, 4096], dtype="bf16", second_dtype="fp32"),
    "cpu": dict(base=(1024, 128, 32000), N=[512, 1024, 2048],
                V=[32000, 64000], H=[64, 256], dtype="fp32", second_dtype="bf16"),
}
QUICK = {
    "cuda": dict(base=(16384, 4096, 128256), N=[4096, 16384], V=[], H=[], dtype="bf16", second_dtype=None),
    "cpu": dict(base=(512, 64, 8000), N=[256, 512], V=[], H=[], dtype="fp32", second_dtype=None),
}

ZIPF_EXPONENT = 1.6
#: ctx["logits"]: how hidden @ weight.T is distributed. Only the Triton backward's opt-in gradient
#: filter (and any kernel that skips work on small softmax values) depends on it.
LOGIT_REGIMES = {
    "std2": "standard deviation 2, uniform labels (every run up to 2026-11-28)",
    "init": "standard deviation 0.6, as a freshly initialised head gives; uniform labels",
    "peaked": f"Zipf-like, as trained models give: a rank-1 direction adds -{ZIPF_EXPONENT} * log(rank) over a "
              "random token order to noise of standard deviation 1, labels drawn from that Zipf prior",
}
#: ctx["margins"] (loss benchmarks): how the rejected rows relate to the chosen ones.
MARGINS = {
    "close": "each rejected row repeats its chosen row with one label changed: |z_w - z_l| stays small, "
             "so no pair's focal factor underflows and every row gets a nonzero dL/dz",
    "independent": "rejected rows drawn like the chosen ones (every run up to 2026-11-28): |z_w - z_l| in the "
                   "hundreds, and about a third of the rows get dL/dz = 0 exactly",
}


@dataclass(frozen=True)
class Point:
    """One benchmark shape: hidden [N, H] x weight [V, H] in ``dtype`` ("bf16" | "fp32")."""

    N: int
    H: int
    V: int
    dtype: str


def torch_dtype(name: str):
    """"bf16" -> torch.bfloat16, "fp32" -> torch.float32."""
    import torch

    table = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def parse_shape(text: str, default_n: int) -> tuple[int, int, int]:
    """"NxHxV" -> (N, H, V); "preset" or "preset:N" -> (N or default_n, H, V) of that preset."""
    text = text.strip().lower()
    name, _, n_text = text.partition(":")
    if name in PRESETS:
        h, v = PRESETS[name]
        return (int(n_text) if n_text else default_n, h, v)
    parts = text.split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"bad shape {text!r}: use NxHxV (e.g. 4096x896x151936) or a preset {sorted(PRESETS)} [:N]")
    n, h, v = (int(p) for p in parts)
    return (n, h, v)


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_input_args(parser: argparse.ArgumentParser) -> None:
    """The flags that choose the inputs, shared by the grid benchmarks, paired.py and profile_loss.py."""
    parser.add_argument("--logits", choices=sorted(LOGIT_REGIMES), default="std2",
                        help="logit regime: " + "; ".join(f"{k}: {v}" for k, v in LOGIT_REGIMES.items()))
    parser.add_argument("--margins", choices=sorted(MARGINS), default="close",
                        help="loss benchmarks, chosen vs rejected rows: "
                             + "; ".join(f"{k}: {v}" for k, v in MARGINS.items()))
    parser.add_argument("--filter-eps", type=float, default=0.0,
                        help="Triton backward's gradient filter on |softmax - onehot| (0, the default: exact; "
                             "2**-12 is what bf16 runs up to 2026-11-28 used)")
    parser.add_argument("--seed", type=int, default=0)


def add_common_args(parser: argparse.ArgumentParser, default_modes: tuple[str, ...]) -> None:
    """The flags every grid benchmark (log-probs, loss) shares."""
    parser.add_argument("--quick", action="store_true", help="a small grid that finishes in well under a minute on CPU")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--output", default=None,
                        help="directory for CSV/PNG/markdown (default benchmarks/results/latest-<device>)")
    parser.add_argument("--shapes", type=_str_list, default=None,
                        help="comma list of NxHxV or presets (qwen2.5-0.5b, llama-3-8b, gemma-2-2b)[:N]; "
                             "replaces the sweeps")
    parser.add_argument("--preset", type=_str_list, default=None, help="add these presets at the base N (or each --N)")
    parser.add_argument("--sweep", default=None, type=_str_list,
                        help="which sweeps to run: any of N,V,H (default all of them; 'none' for base point only)")
    parser.add_argument("--N", type=_int_list, default=None, help="override the N sweep values")
    parser.add_argument("--H", type=_int_list, default=None, help="override the H sweep values")
    parser.add_argument("--V", type=_int_list, default=None, help="override the V sweep values")
    parser.add_argument("--base", default=None, help="base point NxHxV of the sweeps")
    parser.add_argument("--dtypes", type=_str_list, default=None,
                        help="dtypes (bf16,fp32); default: the device's main dtype everywhere plus the other "
                             "at the base point")
    parser.add_argument("--modes", type=_str_list, default=list(default_modes), help=f"subset of {','.join(MODES)}")
    parser.add_argument("--methods", type=_str_list, default=None, help="subset of the methods (default all)")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds of timing per point and mode")
    parser.add_argument("--ignore-frac", type=float, default=0.0, help="fraction of labels set to ignore_index")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="loss benchmarks: tokens per row T (N = 2B*T; default 1024 on CUDA, 256 on CPU)")
    add_input_args(parser)
    parser.add_argument("--reps", type=int, default=DEFAULT_REPS, help="timed repetitions per point, at least")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, 1 with --quick on CPU); "
                             "1 is steadier on a shared machine")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per isolated measurement")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="CPU: measure in this process instead of a fresh subprocess per method and shape "
                             "(faster; peak RSS is then polluted by earlier methods)")
    parser.add_argument("--gemm-n", type=int, default=None, help="size of the square GEMM that measures the peak")
    parser.add_argument("--no-plots", dest="plots", action="store_false")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows already in --output's CSV (points measured by an earlier call) "
                             "and add these")
    parser.add_argument("--baseline", default=os.environ.get("DRDO_BENCH_BASELINE") or None,
                        help="a folder holding an older drdo/ and drdo_kernels/ "
                             "(e.g. `git archive OLD drdo drdo_kernels` unpacked): its kernels run as "
                             "base_triton / base_chunked / base_torch, each in a fresh process "
                             "(default $DRDO_BENCH_BASELINE)")


def resolve_device(requested: str | None) -> str:
    """The device to run on; refuses "cuda" without a GPU."""
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    return requested


def build_grid(args: argparse.Namespace, device: str) -> list[Point]:
    """Points to measure, in order, without duplicates."""
    spec = dict((QUICK if args.quick else SWEEPS)[device])
    base = parse_shape(args.base, 0) if args.base else spec["base"]
    dtypes = args.dtypes or [spec["dtype"]]
    for d in dtypes:
        torch_dtype(d)
    shapes: list[tuple[int, int, int]] = []
    if args.shapes:
        shapes = [parse_shape(s, base[0]) for s in args.shapes]
    else:
        sweeps = [s.upper() for s in (args.sweep or ["N", "V", "H"])]
        bad = [s for s in sweeps if s not in ("N", "V", "H", "NONE")]
        if bad:
            raise SystemExit(f"--sweep takes N, V, H or none, got {bad}")
        shapes.append(base)
        if "N" in sweeps:
            shapes += [(n, base[1], base[2]) for n in (args.N or spec["N"])]
        if "V" in sweeps:
            shapes += [(base[0], base[1], v) for v in (args.V or spec["V"])]
        if "H" in sweeps:
            shapes += [(base[0], h, base[2]) for h in (args.H or spec["H"])]
    for name in args.preset or []:
        for n in (args.N or [base[0]]):
            shapes.append(parse_shape(f"{name}:{n}", n))
    points = [Point(n, h, v, d) for d in dtypes for (n, h, v) in shapes]
    if args.dtypes is None and spec.get("second_dtype") and not args.shapes:
        points.append(Point(*base, spec["second_dtype"]))
    seen, out = set(), []
    for p in points:
        if p not in seen:
            seen.add(p)
            out.append(p)
    bad_modes = [m for m in args.modes if m not in MODES]
    if bad_modes:
        raise SystemExit(f"--modes takes {MODES}, got {bad_modes}")
    return out


def default_output(device: str) -> Path:
    return ROOT / "benchmarks" / "results" / f"latest-{device}"


def write_csv(rows: list[dict], path: Path, columns: list[str] = CSV_COLUMNS) -> Path:
    """Write rows (dicts) with ``columns`` first, then any extra keys; numbers as they are, text
    through :func:`portable`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = [k for r in rows for k in r if k not in columns]
    header = columns + list(dict.fromkeys(extra))
    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _fmt(r.get(k, "")) for k in header})
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _fmt(v):
    if isinstance(v, float):
        return "" if v != v else f"{v:.6g}"
    return portable(v) if isinstance(v, str) else v


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:~-])(?<![\w:]/)(?:/[\w.+@-]+)+/?")  # not inside URLs or ratios
_PACKAGE_DIRS = ("site-packages", "dist-packages")


def _portable_path(path: str) -> str:
    parts = [p for p in path.split("/") if p]
    root = [p for p in str(ROOT).split("/") if p]
    if parts[:len(root)] == root:  # this checkout: relative to its root
        return "/".join(parts[len(root):]) or "."
    for name in _PACKAGE_DIRS:  # an installed package: from the package's name on
        if name in parts and parts.index(name) < len(parts) - 1:
            return "/".join(parts[parts.index(name) + 1:])
    return parts[-1]


def portable(text: str) -> str:
    """``text`` with every absolute path made machine-independent: paths in this checkout relative
    to its root, paths of installed packages from the package's folder on, any other path its last
    component (the folder's or file's name)."""
    return _ABSOLUTE_PATH.sub(lambda m: _portable_path(m.group(0)), text)


def interpret_mode() -> bool:
    """True when Triton runs in its CPU interpreter (TRITON_INTERPRET=1)."""
    from drdo_kernels.triton_runtime import triton_interpreting

    return triton_interpreting()


def set_threads(n: int | None) -> None:
    """Apply --threads (None keeps torch's default)."""
    import torch

    if n:
        torch.set_num_threads(int(n))
