"""Figures for the calibration report: reliability diagrams and per-layer routing shares.

Agg backend, fixed DPI and no tight bounding box: files come out the same size on every machine
(tests and report layouts rely on it). Each function saves a PNG and returns its path.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from trinityx_ds.calibration.metrics import ece, reliability_table  # noqa: E402

DPI = 100
PANEL_IN = 5.0  # a reliability panel is PANEL_IN x PANEL_IN inches


def _panel(ax, table: list[dict], ece_value: float, name: str, color: str) -> None:
    full = [b for b in table if b["count"]]
    lows = [b["lower"] for b in full]
    widths = [b["upper"] - b["lower"] for b in full]
    acc = [b["accuracy"] for b in full]
    conf = [b["confidence"] for b in full]
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration", zorder=3)
    ax.bar(lows, acc, width=widths, align="edge", color=color, edgecolor="black", lw=0.6, label="accuracy")
    # gap overlay: from accuracy to the bin's mean confidence
    ax.bar(lows, [c - a for a, c in zip(acc, conf)], bottom=acc, width=widths, align="edge",
           color="tab:red", alpha=0.3, edgecolor="tab:red", hatch="//", lw=0.6, label="gap to confidence")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (max probability)", ylabel="accuracy",
           title=f"{name}: ECE = {ece_value:.3f}", aspect="equal")


def reliability_diagram(probs_NC, labels_N, path, title: str = "Router reliability", probs_after_NC=None,
                        n_bins: int = 10) -> Path:
    """Accuracy per equal-width confidence bin against the diagonal, gaps shaded, ECE in the title.

    With `probs_after_NC` (e.g. after temperature scaling) a second panel shows the calibrated
    probabilities, with the before/after curves of mean confidence -> accuracy overlaid on it.
    """
    runs = [("before" if probs_after_NC is not None else "probabilities", probs_NC, "tab:blue")]
    if probs_after_NC is not None:
        runs.append(("after", probs_after_NC, "tab:green"))
    fig, axes = plt.subplots(1, len(runs), figsize=(PANEL_IN * len(runs), PANEL_IN), dpi=DPI, squeeze=False)
    tables = []
    for ax, (name, probs, color) in zip(axes[0], runs):
        tables.append((name, color, reliability_table(probs, labels_N, n_bins)))
        _panel(ax, tables[-1][2], ece(probs, labels_N, n_bins), name, color)
    if len(runs) == 2:
        for name, color, table in tables:
            full = [b for b in table if b["count"]]
            axes[0][1].plot([b["confidence"] for b in full], [b["accuracy"] for b in full], "o-",
                            color=color, mec="black", ms=4, label=f"{name} curve")
    axes[0][-1].legend(loc="upper left", fontsize=7)
    fig.suptitle(title)
    fig.subplots_adjust(left=0.12 / len(runs), right=1 - 0.04 / len(runs), bottom=0.1, top=0.86, wspace=0.25)
    return _save(fig, path)


def routing_heatmap(share_LE, expert_names: list[str], path, title: str = "Routing share per layer") -> Path:
    """Share of tokens (or weight) each expert gets at each routed layer, value written in each cell.

    Size: (2.5 + 1.2 E) x (1.5 + 0.4 L) inches at DPI, so cells keep a readable size.
    """
    share_LE = torch.as_tensor(share_LE, dtype=torch.float64)
    n_layers, n_experts = share_LE.shape
    if n_experts != len(expert_names):
        raise ValueError(f"share has {n_experts} experts, {len(expert_names)} names given")
    fig, ax = plt.subplots(figsize=(2.5 + 1.2 * n_experts, 1.5 + 0.4 * n_layers), dpi=DPI)
    image = ax.imshow(share_LE.numpy(), cmap="viridis", vmin=0.0, vmax=max(1.0, float(share_LE.max())),
                      aspect="auto")
    for layer in range(n_layers):
        for e in range(n_experts):
            v = float(share_LE[layer, e])
            ax.text(e, layer, f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if v > 0.6 else "white")
    ax.set_xticks(range(n_experts), expert_names)
    ax.set_yticks(range(n_layers), [f"layer {i}" for i in range(n_layers)])
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share")
    fig.tight_layout()  # rearranges within the fixed figure size; the PNG size is unchanged
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    plt.close(fig)
    return path
