"""PNG figures: success bars per method × suite, and the router's confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on eval machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.robot.harness.summary import Confusion, Table  # noqa: E402
from prismatic.io import atomic_path  # noqa: E402


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def success_bars(table: Table, path: Path | str) -> Path:
    cols = [*table.labels(), "avg"]
    x = np.arange(len(cols))
    width = 0.8 / max(len(table.methods), 1)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(cols) * max(1, len(table.methods) / 3), 3.6))
    for i, m in enumerate(table.methods):
        vals = [table.rate(m, c) for c in table.columns] + [table.avg(m)]
        ax.bar(x + (i - (len(table.methods) - 1) / 2) * width, [np.nan if v is None else v for v in vals],
               width, label=m, color=plt.cm.tab20(i % 20))  # the default cycle repeats after 10 methods
    ax.set_xticks(x, cols)
    ax.set_ylim(0, 100)
    ax.set_ylabel("success rate (%)")
    ax.set_title(table.title)
    ax.legend(fontsize="small", ncol=min(len(table.methods), 4), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    return _save(fig, Path(path))


def confusion_matrix(conf: Confusion, path: Path | str) -> Path:
    m = np.asarray(conf.counts, dtype=float)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.5 + 1.0 * len(conf.pred_labels), 1.2 + 0.9 * len(conf.true_labels)))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(conf.pred_labels)), conf.pred_labels, rotation=30, ha="right")
    ax.set_yticks(range(len(conf.true_labels)), conf.true_labels)
    ax.set_xlabel("routed expert")
    ax.set_ylabel("episode's suite")
    ax.set_title(f"{conf.method}: routing accuracy {conf.accuracy:.1f}%")
    return _save(fig, Path(path))
