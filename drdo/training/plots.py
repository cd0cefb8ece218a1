"""training_curves.png from metrics.jsonl (matplotlib, Agg backend, imported lazily)."""
from __future__ import annotations

import math

from drdo.atomic import save_figure
from drdo.training.metrics import read_metrics

#: Panels drawn when present in the log, in this order.
PANELS = ("loss", "distill", "pref", "bt", "nll", "p_w", "reward_acc", "reward_margin", "grad_norm", "lr")


def plot_training_curves(metrics_path: str, output_path: str, *, title: str | None = None) -> str:
    """Draw one panel per logged quantity against the step; returns output_path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    if not rows:
        raise ValueError(f"{metrics_path} holds no metrics to plot")
    keys = [k for k in PANELS if any(_finite(r.get(k)) for r in rows)]
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if _finite(r.get(key))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, output_path, dpi=100)
    plt.close(fig)
    return output_path


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
