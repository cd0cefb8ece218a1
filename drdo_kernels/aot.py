"""Ahead-of-time compile every Triton kernel drdo_kernels launches, without a GPU.

    python -m drdo_kernels.aot --arch sm_90      # H100 / H200 (shared memory limit 227 KiB)
    python -m drdo_kernels.aot --arch sm_80      # A100 (163 KiB)

Kernel variants come from ``drdo_kernels.logprobs_triton.aot_specs()`` and
``drdo_kernels.pair_loss.aot_specs()``: lists of (name, jit_fn, signature,
constexprs, num_warps, num_stages[, aligned_ints]) covering the dtypes, bias/no-bias and
block configurations the launchers use. Each is compiled in two specialisations:

* ``aligned``: what ``@triton.jit`` launches on ordinary tensors: every pointer marked
  16-byte aligned and every integer named in ``aligned_ints`` marked a multiple of 16
  (``tt.divisibility = 16``, as ``triton.runtime.jit`` specialises arguments); this
  decides vector widths and the pipelined copies, hence shared memory and registers;
* ``generic``: no divisibility hints (misaligned pointers or odd sizes).

For each it prints the shared memory (``kernel.metadata.shared``), the registers /
spill bytes reported by the ``ptxas -v`` bundled with Triton (or why they are
unavailable), and the matrix instructions in the PTX (``wgmma`` shapes on sm_90,
``mma.sync`` on sm_80, ``fma`` when the dots fall back to CUDA cores). Exit status 1 on
any compile failure or shared memory above the architecture's limit.
TRITON_INTERPRET must be unset (the interpreter replaces the compiler).
"""
from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

from drdo_kernels.triton_runtime import triton_interpreting

#: Maximum dynamic shared memory per block (bytes) by compute capability.
SHARED_LIMITS = {90: 227 * 1024, 80: 163 * 1024}
SPEC_MODULES = ("drdo_kernels.logprobs_triton", "drdo_kernels.pair_loss", "drdo_kernels.softmax_fold")


def parse_arch(arch: str) -> int:
    """"sm_90" / "90" / "sm90" -> 90; only the architectures in SHARED_LIMITS."""
    match = re.fullmatch(r"(?:sm_?)?(\d+)a?", arch.strip().lower())
    if not match or int(match.group(1)) not in SHARED_LIMITS:
        raise argparse.ArgumentTypeError(f"--arch must be one of {[f'sm_{c}' for c in SHARED_LIMITS]}, got {arch!r}")
    return int(match.group(1))


def collect_specs(modules=SPEC_MODULES):
    """[(module, spec)] from each module's aot_specs(); import failures raise."""
    specs = []
    for name in modules:
        module = importlib.import_module(name)
        specs.extend((name, spec) for spec in module.aot_specs())
    return specs


def _full_signature(fn, signature: dict, constexprs: dict) -> dict:
    """Signature over every argument in order, constexpr arguments marked "constexpr"."""
    missing = [a for a in fn.arg_names if a not in signature and a not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no signature or constexpr for {missing}")
    return {a: ("constexpr" if a in constexprs else signature[a]) for a in fn.arg_names}


VARIANTS = ("aligned", "generic")


def divisibility_attrs(fn, full_signature: dict, aligned_ints=()) -> dict:
    """ASTSource attrs marking every pointer and the integers in `aligned_ints` divisible by 16."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if full_signature[name].startswith("*") or name in aligned_ints}


def compile_spec(spec, capability: int, variant: str = "aligned"):
    """Compile one (name, fn, signature, constexprs, num_warps, num_stages[, aligned_ints]) for
    sm_<capability>, in the "aligned" (as launched) or "generic" specialisation."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    _, fn, signature, constexprs, num_warps, num_stages = spec[:6]
    aligned_ints = spec[6] if len(spec) > 6 else ()
    full = _full_signature(fn, signature, constexprs)
    attrs = divisibility_attrs(fn, full, aligned_ints) if variant == "aligned" else {}
    source = ASTSource(fn=fn, signature=full, constexprs=dict(constexprs), attrs=attrs)
    return triton_compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _ptxas_candidates(capability: int) -> list[str]:
    """The ptxas Triton itself uses for this arch first, then every ptxas* bundled with Triton."""
    import triton

    paths = []
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        paths.append(get_ptxas(capability).path)
    except Exception:  # older/newer Triton without get_ptxas(arch)
        pass
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if os.path.isdir(bin_dir):
        paths += [os.path.join(bin_dir, f) for f in sorted(os.listdir(bin_dir), reverse=True) if f.startswith("ptxas")]
    return [p for i, p in enumerate(paths) if p and os.access(p, os.X_OK) and p not in paths[:i]]


def _ptxas_verbose(ptxas: str, ptx: str, arch: str) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", f"-arch={arch}", path, "-o", os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def register_usage(ptx: str, capability: int) -> tuple[int | None, int | None, int | None, str]:
    """(registers, spill store bytes, spill load bytes, note) from a bundled `ptxas -v`."""
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.MULTILINE)
    if target is None:
        return None, None, None, "no .target line in the PTX"
    candidates = _ptxas_candidates(capability)
    if not candidates:
        return None, None, None, "no ptxas under triton/backends/nvidia/bin"
    last = ""
    for ptxas in candidates:
        code, text = _ptxas_verbose(ptxas, ptx, target.group(1))
        regs = re.search(r"Used (\d+) registers", text)
        if code == 0 and regs is not None:
            spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
            stores, loads = (int(spills.group(1)), int(spills.group(2))) if spills else (None, None)
            return int(regs.group(1)), stores, loads, ""
        last = (text.strip().splitlines() or [f"exit {code}"])[0]
    return None, None, None, f"ptxas -v failed: {last}"


def mma_summary(ptx: str) -> str:
    """The matrix instructions in `ptx`, e.g. "wgmma:m64n128k16+m64n64k16", "mma:m16n8k16",
    both ("wgmma:m64n128k8,mma:m16n8k8": some dots fell back to mma.sync) or "fma"."""
    def shapes(pattern):
        return "+".join(sorted(set(re.findall(pattern, ptx)), key=lambda s: [-int(x) for x in re.findall(r"\d+", s)]))

    parts = [f"{kind}:{found}" for kind, found in (
        ("wgmma", shapes(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)")),
        ("mma", shapes(r"\bmma\.sync\.aligned\.(m\d+n\d+k\d+)"))) if found]
    return ",".join(parts) or "fma"


def _fmt(value) -> str:
    return "n/a" if value is None else str(value)


def _compile_row(job) -> tuple[str, int, int, str, bool]:
    """Worker: compile spec number `index` in `variant`; returns (name, warps, stages, row text, failed)."""
    index, variant, capability, modules = job
    module, spec = collect_specs(modules)[index]
    name, num_warps, num_stages = spec[0], spec[4], spec[5]
    start = time.time()
    try:
        kernel = compile_spec(spec, capability, variant)
    except Exception as exc:
        return name, num_warps, num_stages, f"{variant:<8} FAILED ({module}): {type(exc).__name__}: {exc}", True
    limit = SHARED_LIMITS[capability]
    shared = int(kernel.metadata.shared)
    regs, stores, loads, note = register_usage(kernel.asm["ptx"], capability)
    failed = shared > limit
    status = f"FAILED: shared memory {shared} B > {limit} B" if failed else "ok"
    if note:
        status += f" (registers unavailable: {note})"
    row = (f"{variant:<8} {shared:>9} {_fmt(regs):>5} {_fmt(stores):>8} {_fmt(loads):>8} "
           f"{mma_summary(kernel.asm['ptx']):<26} {time.time() - start:>5.1f}  {status}")
    return name, num_warps, num_stages, row, failed


def run(capability: int, modules=SPEC_MODULES, out=sys.stdout, jobs: int | None = None,
        variants=VARIANTS) -> int:
    """Compile everything (in `jobs` processes), print one row per kernel and variant; returns the exit status."""
    limit = SHARED_LIMITS[capability]
    try:
        specs = collect_specs(modules)
    except Exception as exc:  # an unimportable module is a failure, not a crash
        print(f"FAILED to collect kernel specs: {type(exc).__name__}: {exc}", file=out)
        return 1
    print(f"AOT compile for sm_{capability} (shared memory limit {limit // 1024} KiB), {len(specs)} kernels "
          f"x {len(variants)} variants ({', '.join(variants)})", file=out)
    print(f"{'kernel':<34} {'warps':>5} {'stages':>6} {'variant':<8} {'shared_B':>9} {'regs':>5} {'spill_st':>8} "
          f"{'spill_ld':>8} {'mma':<26} {'secs':>5}  status", file=out, flush=True)
    work = [(i, variant, capability, tuple(modules)) for i in range(len(specs)) for variant in variants]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(work)))
    failures = 0
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        for name, num_warps, num_stages, row, failed in pool.map(_compile_row, work):
            failures += failed
            print(f"{name:<34} {num_warps:>5} {num_stages:>6} {row}", file=out, flush=True)
    print(f"{len(work) - failures}/{len(work)} kernels ok", file=out)
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drdo_kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=parse_arch, default=90, help="sm_90 (default) or sm_80")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: all CPUs)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated specialisations to compile: aligned (as launched), generic")
    args = parser.parse_args(argv)
    variants = tuple(v for v in args.variants.split(",") if v)
    if not variants or any(v not in VARIANTS for v in variants):
        parser.error(f"--variants must be a comma-separated subset of {VARIANTS}, got {args.variants!r}")
    if triton_interpreting():
        print("TRITON_INTERPRET is set: unset it, the interpreter cannot compile kernels", file=sys.stderr)
        return 2
    return run(args.arch, jobs=args.jobs, variants=variants)


if __name__ == "__main__":
    sys.exit(main())
