"""``training_curves_with_accuracy.png``: loss, perplexity and accuracy of a run's history."""

from __future__ import annotations

import math
from pathlib import Path

from .checkpoint import atomic_write


def plot_curves(history: dict, path: Path) -> None:
    """Loss, perplexity and accuracy against steps (top) and tokens (bottom), train and validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr, ev = history["train_log"], history
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for row, (key_tr, key_ev, xlabel) in enumerate((("steps", "val_steps", "optimizer step"),
                                                    ("tokens", "val_tokens", "training tokens"))):
        series = (("loss", tr["losses"], ev["val_losses"], lambda v: v),
                  ("perplexity", tr["losses"], ev["val_losses"], lambda v: math.exp(min(v, 50.0))),
                  ("next-token accuracy", tr["accuracies"], ev["val_accuracies"], lambda v: v))
        for ax, (name, tr_vals, ev_vals, f) in zip(axes[row], series):
            ax.plot(tr[key_tr], [f(v) for v in tr_vals], label="train")
            ax.plot(ev[key_ev], [f(v) for v in ev_vals], "o-", label="validation")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(name)
            if name == "perplexity":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
