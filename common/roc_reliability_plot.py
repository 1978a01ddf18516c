"""The ROC curve and reliability diagram of a scored set, as one PNG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.clinical_metrics import ECE_BINS, clinical_metrics
from common.files import atomic_write
from common.threshold import POSITIVE_CLASS, OperatingPoint

__all__ = ["plot_roc_reliability"]


def plot_roc_reliability(
    path: str | Path, labels: np.ndarray, prob: np.ndarray, *, label_names: Sequence[str],
    threshold: OperatingPoint | float | None = None, title: str = "", metrics: Mapping[str, Any] | None = None,
) -> None:
    """One PNG: the ROC curve(s) (binary: the positive class, with the operating point; else one
    vs rest per class present) and the reliability diagram of the max probability. `metrics`:
    `clinical_metrics` of the same arguments, if already computed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    names = tuple(label_names)
    labels = np.asarray(labels, dtype=np.int64)
    prob = np.asarray(prob, dtype=np.float64)
    m = metrics if metrics is not None else clinical_metrics(labels, prob, threshold, names)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.5))
    ax1.plot([0, 1], [0, 1], ls=":", color="grey")
    if len(names) == 2:
        if len(np.unique(labels)) == 2:
            fpr, tpr, _ = roc_curve(labels == POSITIVE_CLASS, prob[:, POSITIVE_CLASS])
            ax1.plot(fpr, tpr, label=f"{names[POSITIVE_CLASS]} (AUC {m['auc']:.3f})")
        if m["sensitivity"] is not None and m["specificity"] is not None:
            ax1.plot([1 - m["specificity"]], [m["sensitivity"]], "o", color="red",
                     label=(f"operating point (t={m['threshold']:.3f})" if m["threshold"] is not None
                            else "operating point"))
    else:
        for k in np.unique(labels):
            if 0 < (labels == k).sum() < labels.size:
                fpr, tpr, _ = roc_curve(labels == k, prob[:, k])
                ax1.plot(fpr, tpr, lw=1, label=names[k][:30])
    ax1.set_xlabel("1 - specificity")
    ax1.set_ylabel("sensitivity")
    ax1.set_title("ROC" + (f" (AUC {m['auc']:.3f})" if m["auc"] is not None else ""))
    ax1.legend(loc="lower right", fontsize=7)
    rows = [r for r in m["ece_bins"] if r["count"]]
    ax2.plot([0, 1], [0, 1], ls=":", color="grey", label="perfect calibration")
    ax2.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], marker="o", label="observed")
    for r in rows:
        ax2.annotate(str(r["count"]), (r["confidence"], r["accuracy"]), fontsize=6, xytext=(3, -8),
                     textcoords="offset points")
    ax2.set_xlim(0, 1)
    ax2.set_ylim(0, 1)
    ax2.set_xlabel(f"confidence (max probability, {ECE_BINS} bins)")
    ax2.set_ylabel("accuracy")
    ax2.set_title(f"reliability (ECE {m['ece']:.3f})")
    ax2.legend(loc="upper left", fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(Path(path)) as fh:
        fig.savefig(fh, dpi=100, format="png")
    plt.close(fig)
