"""Figures for the report, drawn with matplotlib's Agg backend and returned as PNG bytes (no display)."""

from __future__ import annotations

import io

import numpy as np

from fmrirecon.report.inputs import LossLog

# A running mean over this many steps is drawn over noisy per-step losses (raw values stay visible, faint).
SMOOTHING_WINDOW = 25


def array_to_png(image: np.ndarray) -> bytes:
    """Encode ``uint8 (H, W, 3)`` (or ``(H, W)``) as PNG bytes."""
    from PIL import Image

    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got dtype {image.dtype} shape {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _running_mean(values: np.ndarray, window: int) -> np.ndarray:
    finite = np.where(np.isfinite(values), values, 0.0)
    counts = np.convolve(np.isfinite(values).astype(float), np.ones(window), mode="valid")
    sums = np.convolve(finite, np.ones(window), mode="valid")
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


def loss_plot_png(logs: list[LossLog], title: str, dpi: int = 80) -> bytes:
    """One panel per training stage, one line per loss; log y-axis when every value is positive."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # At most two panels per row keeps each stage readable when a method has many (NeuralDiffuser: 4+).
    ncols = min(len(logs), 2)
    nrows = -(-len(logs) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False, dpi=dpi)
    for ax in axes.flat[len(logs) :]:
        ax.set_visible(False)
    for ax, log in zip(axes.flat, logs, strict=False):
        all_positive = True
        for name, values in log.losses.items():
            finite = np.isfinite(values)
            if not finite.any():
                continue
            all_positive &= bool((values[finite] > 0).all())
            if finite.sum() > 2 * SMOOTHING_WINDOW:
                (line,) = ax.plot(log.steps[finite], values[finite], alpha=0.25, linewidth=0.8)
                smooth = _running_mean(values, SMOOTHING_WINDOW)
                ax.plot(log.steps[SMOOTHING_WINDOW - 1 :], smooth, color=line.get_color(), label=name)
            else:
                ax.plot(log.steps[finite], values[finite], marker=".", markersize=3, label=name)
        if all_positive:
            ax.set_yscale("log")
        ax.set_title(log.stage, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
