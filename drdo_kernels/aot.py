"""Ahead-of-time compile every Triton kernel variant drdo_kernels launches, without a GPU.

    python -m drdo_kernels.aot --arch sm_90      # H100 / H200 (shared memory limit 227 KiB)
    python -m drdo_kernels.aot --arch sm_80      # A100 (163 KiB)
    python -m drdo_kernels.aot --table           # both, as the Markdown table of docs/kernels.md
    python -m drdo_kernels.aot --list            # the launched variants, without compiling

Which variants: a dry run (:func:`launched_variants`) calls the package's own launchers
(``logprobs_triton.logprobs_forward`` / ``logprobs_backward``, the chunked backend's
``logprobs_forward`` / ``logprobs_backward`` with their ``softmax_fold`` launches, and
``pair_loss.triton_pair_terms``) on ``meta`` tensors over a grid of shapes
(:data:`VOCAB_SIZES` x :data:`HIDDEN_SIZES`, row counts, chunk offsets), every dtype, bias and
gradient combination the API accepts, TF32 on and off. Each launch is caught before it reaches
the GPU and specialised with Triton's own binder (``create_function_from_signature`` over the
kernel's parameters, the code ``JITFunction.run`` uses): an integer equal to 1 becomes a
constexpr, an integer divisible by 16 and a pointer whose address is divisible by 16 get
``tt.divisibility = 16``, unless the kernel opts out (``do_not_specialize``). A ``meta``
tensor's address is its byte offset, so a slice at row ``lo`` is as aligned as on a GPU
(whose allocations and parameters start 16-byte aligned). Launches with the same
specialisation key are one variant.

For each variant it prints the shared memory (``kernel.metadata.shared``), the registers,
stack frame and spill bytes from the ``ptxas -v`` log of the compile itself (the numbers the
driver later reports as ``n_regs`` / ``n_spills``), and the matrix instructions in the PTX
(``wgmma`` shapes on sm_90, ``mma.sync`` on sm_80, ``fma`` when the dots run on CUDA cores).
Exit status 1 on a compile failure, shared memory above the architecture's limit, or a spill.
TRITON_INTERPRET must be unset (the interpreter replaces the compiler).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import itertools
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from unittest import mock

import torch

from drdo_kernels.triton_runtime import triton_interpreting

#: Maximum dynamic shared memory per block (bytes) by compute capability.
SHARED_LIMITS = {90: 227 * 1024, 80: 163 * 1024}
#: Streaming multiprocessors of the reference GPU of each architecture (H100 SXM, A100): the
#: forward launcher sizes its vocab splits by it.
SM_COUNTS = {90: 132, 80: 108}
SPEC_MODULES = ("drdo_kernels.logprobs_triton", "drdo_kernels.pair_loss", "drdo_kernels.softmax_fold")
#: The shape grid of the dry run: LM-head vocabularies (32003 and 50257 are not multiples of 16)
#: and hidden sizes, plus one hidden size that is not a multiple of 16.
VOCAB_SIZES = (32000, 32003, 50257, 128256, 151936, 256000)
HIDDEN_SIZES = (896, 2048, 4096, 5120, 8192, 4100)
#: Token counts (1 is specialised to a constant, 16 divides, 130 neither), and (token count,
#: chunk rows) of the chunked backend (3-row chunks start at every residue of 4).
ROW_COUNTS = (1, 16, 130)
CHUNKINGS = ((1, 1), (16, 3), (130, 64))
PAIR_COUNTS = (1, 32, 33)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Variant:
    """One specialisation of one kernel, as ``JITFunction.run`` would compile it: the signature
    ({name: type}), constexprs ({(index,): value}), attrs ({(index,): [["tt.divisibility", 16]]})
    and the launch options."""

    fn: object
    signature: tuple
    constexprs: tuple
    attrs: tuple
    num_warps: int
    num_stages: int

    @property
    def kernel(self) -> str:
        return self.fn.__name__.strip("_").removesuffix("_kernel")

    def key(self) -> tuple:
        return (self.fn.__module__, self.fn.__name__, self.signature, tuple((k, repr(v)) for k, v in self.constexprs),
                self.attrs, self.num_warps, self.num_stages)

    @property
    def digest(self) -> str:
        """10 hex digits naming the specialisation key (stable across processes)."""
        import hashlib

        return hashlib.sha1(repr(self.key()).encode()).hexdigest()[:10]

    def summary(self) -> str:
        """Short text: 16-bit pointer dtypes, true flags and other non-tile constexprs, integers
        divisible by 16 ("D:"), integers specialised to 1 ("=1:"), pointers not known 16-byte
        aligned ("u:")."""
        names = [name for name, _ in self.signature]
        declared = {p.name: p.is_constexpr for p in self.fn.params}
        consts = {names[k[0]]: v for k, v in self.constexprs}
        aligned = {names[k[0]] for k, v in self.attrs if v}
        parts = [f"{n.removesuffix('_ptr')}:{t[1:]}" for n, t in self.signature if t in ("*bf16", "*fp16")]
        for name, value in consts.items():
            if not declared[name] or value is False or name.startswith(("BLOCK", "GROUP", "N_")):
                continue
            parts.append(name if value is True else f"{name}={value}")
        ints = [n for n, t in self.signature if t in ("i32", "i64") and n in aligned]
        ones = [n for n in consts if not declared[n]]
        loose = [n for n, t in self.signature if t.startswith("*") and n not in aligned]
        for tag, group in (("D:", ints), ("=1:", ones), ("u:", loose)):
            if group:
                parts.append(tag + ",".join(group))
        return " ".join(parts)


def parse_arch(arch: str) -> int:
    """"sm_90" / "90" / "sm90" -> 90; only the architectures in SHARED_LIMITS."""
    match = re.fullmatch(r"(?:sm_?)?(\d+)a?", arch.strip().lower())
    if not match or int(match.group(1)) not in SHARED_LIMITS:
        raise argparse.ArgumentTypeError(f"--arch must be one of {[f'sm_{c}' for c in SHARED_LIMITS]}, got {arch!r}")
    return int(match.group(1))


# --------------------------------------------------------------------------- specialisation


def _backend(capability: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return make_backend(GPUTarget("cuda", capability, 32))


def binder(fn, backend):
    """Triton's argument binder of `fn`, the one ``JITFunction.run`` builds: (args, kwargs) ->
    (bound arguments, [(type, specialisation)] per argument, options)."""
    from triton.runtime.jit import create_function_from_signature

    return create_function_from_signature(fn.signature, fn.params, backend)


def specialise(fn, backend, args, kwargs, bind=None) -> Variant:
    """The variant ``fn[grid](*args, **kwargs)`` launches: each argument's type and
    specialisation from Triton's binder, turned into signature / constexprs / attrs as
    ``JITFunction`` does before it compiles."""
    bound, specialization, options = (bind or binder(fn, backend))(*args, **kwargs)
    names = list(bound)
    signature = tuple((name, spec[0]) for name, spec in zip(names, specialization))
    constexprs = tuple(((i,), bound[name]) for i, (name, spec) in enumerate(zip(names, specialization))
                       if spec[0] == "constexpr")
    attrs = tuple(((i,), tuple(map(tuple, backend.parse_attr(spec[1]))))
                  for i, spec in enumerate(specialization) if spec[0] != "constexpr" and isinstance(spec[1], str))
    parsed = backend.parse_options(options)
    return Variant(fn, signature, constexprs, attrs, parsed.num_warps, parsed.num_stages)


def _jit_functions(modules):
    import importlib

    from triton.runtime.jit import JITFunction

    for name in modules:
        module = importlib.import_module(name)
        for value in vars(module).values():
            if isinstance(value, JITFunction):
                yield value


@contextlib.contextmanager
def dry_run(capability: int, modules=SPEC_MODULES):
    """Within it, launching any kernel of `modules` records its :class:`Variant` in the yielded
    {key: Variant} instead of running it, and the launchers see an sm_<capability> GPU:
    SM_COUNTS[capability] multiprocessors, no interpreter workarounds."""
    from . import logprobs_triton, softmax_fold

    backend = _backend(capability)
    seen: dict = {}

    def recorder(fn):
        bind = binder(fn, backend)

        def run(*args, grid, warmup, **kwargs):
            variant = specialise(fn, backend, args, kwargs, bind)
            seen.setdefault(variant.key(), variant)
        return run

    with contextlib.ExitStack() as stack:
        for fn in _jit_functions(modules):
            stack.enter_context(mock.patch.object(fn, "run", recorder(fn), create=True))
        stack.enter_context(mock.patch.object(logprobs_triton, "_target_programs",
                                              lambda device: 2 * SM_COUNTS[capability]))
        stack.enter_context(mock.patch.object(logprobs_triton, "_upcast_dot", lambda dtype, device: False))
        stack.enter_context(mock.patch.object(softmax_fold, "emulate_rounding", lambda dtype, device: False))
        yield seen


@contextlib.contextmanager
def _tf32(allowed: bool):
    before = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("high" if allowed else "highest")
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cuda.matmul.allow_tf32 = before[1]


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def _dtype_pairs():
    """(hidden dtype, weight dtype) the Triton kernels accept: equal, or 16-bit hidden + fp32 weight."""
    return [(d, d) for d in _DTYPES] + [(d, torch.float32) for d in _DTYPES[1:]]


def _gradient_flags(has_bias: bool):
    """(need_hidden, need_weight, need_bias) with at least one gradient; without a bias, no d_bias."""
    flags = itertools.product((True, False), repeat=3)
    return [f for f in flags if any(f) and (has_bias or not f[2])]


def _transforms():
    """The identity, a linear transform (temperature / logit scale) and a softcap."""
    from .logit_transform import IDENTITY, logit_transform

    return IDENTITY, logit_transform(temperature=0.7), logit_transform(softcap=30.0)


def _fused_launches(n_vocab: int, n_hidden: int) -> None:
    """The Triton backend's forward and backward: every dtype pair, no bias or a bias of the
    weight's dtype, every transform, TF32 on and off for fp32, every gradient subset, the filter,
    with and without the per-token entropy."""
    from . import logprobs_triton as lt

    for (hdt, wdt), has_bias, transform in itertools.product(_dtype_pairs(), (False, True), _transforms()):
        for tf32 in ((False, True) if hdt == torch.float32 else (False,)):
            with _tf32(tf32):
                _fused_case(lt, hdt, wdt, has_bias, transform, n_vocab, n_hidden)


def _fused_case(lt, hdt, wdt, has_bias, transform, n_vocab, n_hidden):
    weight = _meta(n_vocab, n_hidden, dtype=wdt)
    bias = _meta(n_vocab, dtype=wdt) if has_bias else None
    for m in ROW_COUNTS:
        hidden, labels = _meta(m, n_hidden, dtype=hdt), _meta(m, dtype=torch.int64)
        _, lse = lt.logprobs_forward(hidden, weight, bias, labels, transform=transform)
        _, _, ent = lt.logprobs_forward(hidden, weight, bias, labels, transform=transform, entropy=True)
        for (need_h, need_w, need_b), eps, with_entropy in itertools.product(
                _gradient_flags(has_bias), (0.0, 2.0**-12), (False, True)):
            lt.logprobs_backward(_meta(m), hidden, weight, bias, labels, lse, need_w, need_hidden_grad=need_h,
                                 need_bias_grad=need_b, filter_eps=eps, transform=transform,
                                 entropy=ent if with_entropy else None, grad_entropy=_meta(m) if with_entropy else None)


def _fold_launches(n_vocab: int) -> None:
    """The fold kernels over their whole API (bias, transform, output dtype, raw or transformed
    logits, the entropy), on a fresh [c, V] buffer with labels / lse / g sliced at every row offset mod 4."""
    from . import softmax_fold

    for rows, lo in itertools.product((1, 5), range(4)):
        labels, stats = _meta(lo + rows, dtype=torch.int64)[lo:], _meta(lo + rows)[lo:]
        for has_bias, transform, entropy in itertools.product((False, True), _transforms(), (False, True)):
            softmax_fold.row_stats(_meta(rows, n_vocab), _meta(n_vocab) if has_bias else None, labels, True,
                                   transform, entropy=entropy)
        for out_dtype, transform, raw, entropy in itertools.product(_DTYPES, _transforms(), (False, True),
                                                                    (False, True)):
            softmax_fold.softmax_grad(_meta(rows, n_vocab), labels, stats, stats, out_dtype, True, transform, raw,
                                      entropy=stats if entropy else None, grad_entropy=stats if entropy else None)


def _chunked_launches(n_vocab: int, n_hidden: int) -> None:
    """The chunked backend's passes with the Triton fold, as they call it."""
    from . import logprobs_chunked as chunked

    for (hdt, wdt), has_bias, transform in itertools.product(_dtype_pairs(), (False, True), _transforms()):
        gemms = chunked.LMHeadGemms(_meta(n_vocab, n_hidden, dtype=wdt), hdt)
        bias = _meta(n_vocab) if has_bias else None
        for m, rows in CHUNKINGS:
            hidden, labels = _meta(m, n_hidden, dtype=hdt), _meta(m, dtype=torch.int64)
            _, lse = chunked.logprobs_forward(hidden, labels, gemms, bias, rows, True, transform)
            chunked.logprobs_backward(_meta(m), hidden, labels, lse, gemms, bias, rows, True, transform=transform)
            _, lse, ent = chunked.logprobs_forward(hidden, labels, gemms, bias, rows, True, transform, entropy=True)
            chunked.logprobs_backward(_meta(m), hidden, labels, lse, gemms, bias, rows, True, transform=transform,
                                      entropy=ent, grad_entropy=_meta(m))


def _pair_launches() -> None:
    from . import pair_loss

    for n_pairs in PAIR_COUNTS:
        pair_loss.triton_pair_terms(_meta(6, n_pairs), 1.0, 2.0, -1.0)


def launched_variants(capability: int, vocab_sizes=VOCAB_SIZES, hidden_sizes=HIDDEN_SIZES) -> list[Variant]:
    """Every variant the launchers request over the grid, deduplicated by specialisation key,
    in first-launch order."""
    with dry_run(capability) as seen:
        for n_vocab in vocab_sizes:
            _fold_launches(n_vocab)
            _chunked_launches(n_vocab, hidden_sizes[0])  # its fold launches see [rows, V] buffers, not H
            for n_hidden in hidden_sizes:
                _fused_launches(n_vocab, n_hidden)
        _pair_launches()
    return list(seen.values())


# --------------------------------------------------------------------------- compile


def compile_variant(variant: Variant, capability: int):
    """triton.compile of `variant` for sm_<capability>, as JITFunction.run would compile it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    attrs = {k: [list(a) for a in v] for k, v in variant.attrs}
    source = ASTSource(fn=variant.fn, signature=dict(variant.signature), constexprs=dict(variant.constexprs),
                       attrs=attrs)
    return triton_compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": variant.num_warps, "num_stages": variant.num_stages})


def parse_ptxas_log(text: str) -> tuple[int | None, int | None, int | None]:
    """(registers, stack frame bytes, spill bytes = stores + loads) from a `ptxas -v` log."""
    regs = re.search(r"Used (\d+) registers", text)
    frame = re.search(r"(\d+) bytes stack frame", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return (int(regs.group(1)) if regs else None, int(frame.group(1)) if frame else None,
            int(spills.group(1)) + int(spills.group(2)) if spills else None)


def mma_summary(ptx: str) -> str:
    """The matrix instructions in `ptx`, e.g. "wgmma:m64n128k16+m64n64k16", "mma:m16n8k16",
    both ("wgmma:m64n128k8,mma:m16n8k8": some dots fell back to mma.sync) or "fma"."""
    def shapes(pattern):
        return "+".join(sorted(set(re.findall(pattern, ptx)), key=lambda s: [-int(x) for x in re.findall(r"\d+", s)]))

    parts = [f"{kind}:{found}" for kind, found in (
        ("wgmma", shapes(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)")),
        ("mma", shapes(r"\bmma\.sync\.aligned\.(m\d+n\d+k\d+)"))) if found]
    return ",".join(parts) or "fma"


@dataclass
class Result:
    """What one compile gave: shared memory, registers, stack frame and spill bytes, matrix
    instructions, seconds, and the failure (empty when ok)."""

    variant: Variant
    shared: int | None = None
    regs: int | None = None
    frame: int | None = None
    spills: int | None = None
    mma: str = ""
    secs: float = 0.0
    error: str = ""


def record(result: Result) -> dict:
    """A Result as a JSON-able dict (what ``--json`` writes and ``--table-from`` reads)."""
    v = result.variant
    return dict(digest=v.digest, kernel=v.kernel, variant=v.summary(), warps=v.num_warps, stages=v.num_stages,
                shared=result.shared, regs=result.regs, frame=result.frame, spills=result.spills, mma=result.mma,
                error=result.error)


def compile_and_measure(variant: Variant, capability: int) -> Result:
    """Compile `variant` with the ptxas log on and read its resources; a failure is in .error."""
    from triton import knobs

    start = time.time()
    log = io.StringIO()
    try:
        with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            kernel = compile_variant(variant, capability)
    except Exception as exc:
        return Result(variant, secs=time.time() - start, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    regs, frame, spills = parse_ptxas_log(log.getvalue())
    result = Result(variant, int(kernel.metadata.shared), regs, frame, spills, mma_summary(kernel.asm["ptx"]),
                    time.time() - start)
    if result.shared > SHARED_LIMITS[capability]:
        result.error = f"shared memory {result.shared} B > {SHARED_LIMITS[capability]} B"
    elif regs is None or spills is None:
        result.error = "no register / spill counts in the ptxas log"
    elif spills or frame:
        result.error = f"spills {spills} B (stack frame {frame} B)"
    return result


_WORK: list = []


def _compile_one(job):
    """Worker: the measurements of variant `index` (a Result without its unpicklable variant)."""
    index, capability = job
    result = compile_and_measure(_WORK[index], capability)
    result.variant = None
    return result


def iter_compiled(variants, capability: int, jobs: int | None = None):
    """compile_and_measure over `variants` in `jobs` forked processes (a fresh Triton cache, so
    every compile runs ptxas); yields the Results in order, as they come."""
    variants = list(variants)
    _WORK[:] = variants
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(variants)))
    with tempfile.TemporaryDirectory(prefix="drdo-aot-cache-") as cache, \
            mock.patch.dict(os.environ, {"TRITON_CACHE_DIR": cache}):
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            jobs = [(i, capability) for i in range(len(variants))]
            for result, variant in zip(pool.map(_compile_one, jobs), variants):
                result.variant = variant
                yield result


def compile_all(variants, capability: int, jobs: int | None = None) -> list[Result]:
    """The Results of :func:`iter_compiled`, as a list."""
    return list(iter_compiled(variants, capability, jobs))


# --------------------------------------------------------------------------- report


def _fmt(value) -> str:
    return "n/a" if value is None else str(value)


HEADER = (f"{'digest':<10} {'kernel':<16} {'warps':>5} {'stages':>6} {'shared_B':>9} {'regs':>5} {'frame_B':>7} "
          f"{'spill_B':>7} {'mma':<28} {'secs':>5}  {'status':<6}  variant")


def format_row(result: Result) -> str:
    v = result.variant
    status = "ok" if not result.error else f"FAILED: {result.error}"
    return (f"{v.digest:<10} {v.kernel:<16} {v.num_warps:>5} {v.num_stages:>6} {_fmt(result.shared):>9} "
            f"{_fmt(result.regs):>5} {_fmt(result.frame):>7} {_fmt(result.spills):>7} {result.mma or '-':<28} "
            f"{result.secs:>5.1f}  "
            f"{status:<6}  {v.summary()}")


def run(capability: int, out=sys.stdout, jobs: int | None = None, json_path: str | None = None) -> int:
    """Derive, compile and print every launched variant for sm_<capability>; returns the exit status."""
    try:
        variants = launched_variants(capability)
    except Exception as exc:  # a launcher that cannot be dry-run is a failure, not a crash
        print(f"FAILED to derive the launched variants: {type(exc).__name__}: {exc}", file=out)
        return 1
    print(f"AOT compile for sm_{capability} (shared memory limit {SHARED_LIMITS[capability] // 1024} KiB): "
          f"{len(variants)} launched variants", file=out)
    print(HEADER, file=out, flush=True)
    results, records = [], []
    for result in iter_compiled(variants, capability, jobs):
        results.append(result)
        print(format_row(result), file=out, flush=True)
        if json_path:  # rewritten after every compile: a long run can be tabulated while it goes
            records.append(record(result))
            with open(json_path, "w") as f:
                json.dump({"capability": capability, "launched": len(variants), "records": records}, f, indent=1)
    failures = sum(bool(r.error) for r in results)
    print(f"{len(results) - failures}/{len(results)} variants ok", file=out)
    return 1 if failures else 0


def markdown_table(records_by_arch: dict, top: int = 2) -> str:
    """The docs/kernels.md table from {capability: (launched count, [record])}: variants compiled, most registers, most
    shared memory and total spills per architecture, then the `top` variants of each kernel with
    the most registers (then shared memory)."""
    import triton

    lines = [f"Generated by `python -m drdo_kernels.aot` on {datetime.date.today().isoformat()} with triton "
             f"{triton.__version__} (`--table`, or `--json` per architecture then `--table-from`).", "",
             "| arch | variants compiled / launched | most registers | most shared memory | spill bytes, all |",
             "|---|---|---|---|---|"]
    for cap, (launched, records) in records_by_arch.items():
        lines.append(f"| sm_{cap} | {len(records)} / {launched} | {max(r['regs'] or 0 for r in records)} | "
                     f"{max(r['shared'] or 0 for r in records) // 1024} KiB | "
                     f"{sum(r['spills'] or 0 for r in records)} |")
    lines += ["", "| arch | kernel | variant | warps | stages | registers | spill bytes | shared (KiB) | mma |",
              "|---|---|---|---|---|---|---|---|---|"]
    for cap, (_, records) in records_by_arch.items():
        for kernel in sorted({r["kernel"] for r in records}):
            mine = sorted((r for r in records if r["kernel"] == kernel),
                          key=lambda r: (-(r["regs"] or 0), -(r["shared"] or 0)))
            for r in mine[:top]:
                lines.append(f"| sm_{cap} | {kernel} | {r['variant'] or '-'} | {r['warps']} | {r['stages']} | "
                             f"{_fmt(r['regs'])} | {_fmt(r['spills'])} | {(r['shared'] or 0) / 1024:.0f} | "
                             f"{r['mma']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drdo_kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=parse_arch, default=90, help="sm_90 (default) or sm_80")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: all CPUs)")
    parser.add_argument("--list", action="store_true", help="only print the launched variants (no compile)")
    parser.add_argument("--table", action="store_true",
                        help="compile for sm_90 and sm_80 and print the Markdown table of docs/kernels.md")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--table-from", nargs="+", default=None, metavar="JSON",
                        help="print the Markdown table from files written by --json (no compile)")
    args = parser.parse_args(argv)
    if args.table_from:
        loaded = [json.load(open(path)) for path in args.table_from]
        print(markdown_table({d["capability"]: (d["launched"], d["records"]) for d in loaded}), end="")
        return 0
    if triton_interpreting():
        print("TRITON_INTERPRET is set: unset it, the interpreter cannot compile kernels", file=sys.stderr)
        return 2
    if args.list:
        for variant in launched_variants(args.arch):
            print(f"{variant.digest} {variant.kernel:<16} {variant.num_warps:>2} {variant.num_stages:>2}  "
                  f"{variant.summary()}")
        return 0
    if args.table:
        records = {}
        for cap in (90, 80):
            variants = launched_variants(cap)
            records[cap] = (len(variants), [record(r) for r in compile_all(variants, cap, args.jobs)])
        print(markdown_table(records), end="")
        return 1 if any(r["error"] for _, rs in records.values() for r in rs) else 0
    return run(args.arch, jobs=args.jobs, json_path=args.json)


if __name__ == "__main__":
    sys.exit(main())
