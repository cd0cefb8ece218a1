"""Benchmark: one DRDO training step (forward, fused loss, backward) on padded vs packed batches.

The data are length-skewed like real preference sets: most responses are short, a few are long,
so a padded batch is mostly padding. Both layouts hold the same pairs and the same real tokens;
tokens/s counts real (non-padding) tokens only. The step is the one ``drdo train`` runs
(:class:`drdo.training.objectives.StageObjective`, stage drdo, fused kernels); on CUDA in bf16
autocast with flash-attn's varlen path when flash_attn imports (else sdpa), on CPU in fp32 with
sdpa (block-diagonal causal mask for the packed row).

Usage: python benchmarks/bench_padding_free.py [--device cpu|cuda] [--quick] [--output DIR]
Writes padding_free.json (and prints one line per layout).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.report import write_portable  # noqa: E402
from drdo.config import TrainConfig  # noqa: E402
from drdo.data import PreferenceCollator  # noqa: E402
from drdo.data.packing import PackedPreferenceCollator  # noqa: E402
from drdo.losses import IGNORE_INDEX  # noqa: E402
from drdo.models import PolicyWithRewardHead, build_tiny_causal_lm, default_attn_implementation  # noqa: E402
from drdo.training.objectives import StageObjective  # noqa: E402
from drdo_kernels import auto_backend  # noqa: E402

SETTINGS = {  # per device: model width, layers, vocabulary, pairs per step, prompt and response lengths
    "cpu": dict(hidden=128, layers=2, heads=4, vocab=8192, pairs=8, prompt=(8, 32), short=(8, 48), long=(256, 384)),
    "cuda": dict(hidden=1024, layers=4, heads=16, vocab=32768, pairs=32, prompt=(32, 128), short=(32, 192),
                 long=(1024, 1536)),
}
QUICK = {"cpu": dict(hidden=64, pairs=4, long=(128, 160)), "cuda": dict(pairs=8)}


def skewed_items(n_pairs: int, vocab: int, prompt, short, long, long_fraction: float, seed: int) -> list[dict]:
    """Tokenized pairs (the layout of drdo.data): every round(1 / long_fraction)-th response is
    long, the others short (lengths drawn uniformly from the given ranges)."""
    rng = random.Random(seed)
    every = max(1, round(1 / long_fraction)) if long_fraction > 0 else None
    items, k = [], 0
    for i in range(n_pairs):
        p = [rng.randrange(vocab) for _ in range(rng.randint(*prompt))]
        item = {"row": i, "oracle_chosen": rng.gauss(0, 1), "oracle_rejected": rng.gauss(0, 1)}
        for side in ("chosen", "rejected"):
            span = long if every and k % every == every // 2 else short
            k += 1
            r = [rng.randrange(vocab) for _ in range(rng.randint(*span))]
            item[f"{side}_input_ids"] = p + r
            item[f"{side}_labels"] = [IGNORE_INDEX] * len(p) + r
        items.append(item)
    return items


def time_step(root, batch: dict, device: torch.device, bf16: bool) -> float:
    """Seconds of one forward + backward."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        loss, _ = root(**batch)
    loss.backward()
    root.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def paired_times(root, batches: dict, device: torch.device, steps: int, bf16: bool) -> dict[str, list[float]]:
    """The layouts alternate step by step (after one warm-up step each), so that a noisy machine
    slows both alike."""
    moved = {name: {k: v.to(device) for k, v in b.items() if k != "rows"} for name, b in batches.items()}
    for batch in moved.values():
        time_step(root, batch, device, bf16)
    times = {name: [] for name in moved}
    for _ in range(steps):
        for name, batch in moved.items():
            times[name].append(time_step(root, batch, device, bf16))
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per layout, alternating (after a warm-up)")
    parser.add_argument("--long-fraction", type=float, default=0.125)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    s = dict(SETTINGS[device.type])
    if args.quick:
        s.update(QUICK[device.type])
    bf16 = device.type == "cuda"
    attn = default_attn_implementation(device, torch.bfloat16 if bf16 else torch.float32)
    lm = build_tiny_causal_lm(vocab_size=s["vocab"], hidden_size=s["hidden"], num_layers=s["layers"],
                              num_heads=s["heads"])
    lm.set_attn_implementation(attn)
    policy = PolicyWithRewardHead(lm).to(device).train()
    root = StageObjective(policy, TrainConfig(stage="drdo", backend="auto"))
    items = skewed_items(s["pairs"], s["vocab"], s["prompt"], s["short"], s["long"], args.long_fraction, seed=0)
    batches = {"padded": PreferenceCollator(pad_token_id=0)(items), "packed": PackedPreferenceCollator()(items)}
    real_tokens = int(batches["padded"]["attention_mask"].sum())
    result = {"device": torch.cuda.get_device_name(device) if bf16 else "cpu", "attn": attn,
              "kernel": auto_backend(device, torch.bfloat16 if bf16 else torch.float32),
              "settings": s, "real_tokens": real_tokens, "long_fraction": args.long_fraction}
    all_times = paired_times(root, batches, device, args.steps, bf16)
    for name, batch in batches.items():
        times = all_times[name]
        median = statistics.median(times)
        result[name] = {"shape": list(batch["input_ids"].shape), "slots": batch["input_ids"].numel(),
                        "median_step_s": median, "tokens_per_s": real_tokens / median}
        print(f"{name:7s} input {tuple(batch['input_ids'].shape)} ({batch['input_ids'].numel()} slots for "
              f"{real_tokens} real tokens): {median * 1e3:.1f} ms/step, {real_tokens / median:,.0f} tokens/s")
    ratios = [a / b for a, b in zip(all_times["padded"], all_times["packed"])]
    result["speedup"] = statistics.median(ratios)  # median over the paired steps of padded time / packed time
    print(f"packed / padded tokens/s (median of paired steps): {result['speedup']:.2f}x "
          f"({attn}, {result['kernel']} kernels, {result['device']})")
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        write_portable(out / "padding_free.json", json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
