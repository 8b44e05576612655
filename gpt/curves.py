"""``training_curves_with_accuracy.png``: a run's loss and accuracy, train and validation.

Two panels, neither repeating the other: loss (perplexity, its exponential, on the right axis) and
next-token accuracy in percent, as the console prints them. Steps below, training tokens above. The
train curve is the one train-loss definition the console also prints: the token-weighted mean over
each ``--log-interval`` steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .checkpoint import atomic_write

MAX_LOSS = 50.0  # exp(50) ~ 5e21: the perplexity axis stops here for diverged runs


def plot_curves(history: dict, path: Path, title: str, tokens_per_step: int) -> None:
    """Write the PNG for ``history`` (the trainer's) to ``path`` with ``title`` above both panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    tr = history["train_log"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(13, 4.8))
    ax_loss.plot(tr["steps"], tr["losses"], label="train")
    ax_loss.plot(history["val_steps"], history["val_losses"], "o-", label="validation")
    ax_loss.set_ylabel("loss (nats per token)")
    ppl = ax_loss.secondary_yaxis("right", functions=(_perplexity, _loss))
    ppl.set_ylabel("perplexity")
    ppl.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1, 2, 5)))  # 10, 20, 50, 100, ...
    ppl.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ppl.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax_acc.plot(tr["steps"], [100 * a for a in tr["accuracies"]], label="train")
    ax_acc.plot(history["val_steps"], [100 * a for a in history["val_accuracies"]], "o-", label="validation")
    ax_acc.set_ylabel("next-token accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("optimizer step")
        tokens = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step, lambda t: t / tokens_per_step))
        tokens.set_xlabel("training tokens")
        tokens.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


def _perplexity(loss):
    return np.exp(np.minimum(loss, MAX_LOSS))


def _loss(perplexity):
    return np.log(np.maximum(perplexity, 1e-12))
