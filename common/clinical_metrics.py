"""The clinical metrics of a scored set: AUC, sensitivity, specificity, confusion matrix and calibration.

`predict_probabilities` scores a set; `clinical_metrics` measures the probabilities against known
labels at a site's decision rule (`common.threshold.OperatingPoint`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from common.maml import EVAL_CHUNK, Params, class_probabilities, predict_logits, roc_auc
from common.medmnist import MedMNISTData
from common.threshold import POSITIVE_CLASS, OperatingPoint, _finite

__all__ = ["clinical_metrics", "expected_calibration_error", "predict_probabilities"]

ECE_BINS = 15


def predict_probabilities(model: nn.Module, params: Params, data: MedMNISTData, *,
                          chunk: int = EVAL_CHUNK) -> np.ndarray:
    """Class probabilities (n, classes) of every image of `data`, converted and scored `chunk` at a time
    (the chunks of `common.maml.evaluate`, so the same numbers for the same records in the same order)."""
    n = len(data)
    if n == 0:
        raise ValueError("no images to score")
    parts = [class_probabilities(predict_logits(model, params, data.to_tensor(np.arange(lo, min(lo + chunk, n)))[0]))
             for lo in range(0, n, chunk)]
    return np.concatenate(parts)


def expected_calibration_error(labels: np.ndarray, prob: np.ndarray, *,
                               bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """ECE over `bins` equal-width bins of the max probability (Guo et al. 2017), and the bins."""
    labels = np.asarray(labels)
    conf = prob.max(1)
    correct = (prob.argmax(1) == labels).astype(np.float64)
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)  # (lo, hi] bins
    table, ece = [], 0.0
    for b in range(bins):
        m = which == b
        n = int(m.sum())
        row = {"lower": b / bins, "upper": (b + 1) / bins, "count": n, "confidence": None, "accuracy": None}
        if n:
            row["confidence"], row["accuracy"] = float(conf[m].mean()), float(correct[m].mean())
            ece += n / labels.size * abs(row["accuracy"] - row["confidence"])
        table.append(row)
    return float(ece), table


def _rate(num: int, den: int) -> float | None:
    return float(num) / den if den else None


def clinical_metrics(
    labels: np.ndarray, prob: np.ndarray, threshold: OperatingPoint | float | None, label_names: Sequence[str],
) -> dict[str, Any]:
    """AUC, accuracy, sensitivity/specificity at the decision rule, confusion matrix and calibration.

    `threshold`: an `OperatingPoint`, a threshold on P(class 1) (binary), or None for argmax.
    AUC is `common.maml.roc_auc` (the numbers `evaluate` reports). Binary: sensitivity and
    specificity of the positive class (class 1); multi-class: one-vs-rest per class. Rates with
    an empty denominator, and AUC of a single-class set, are None.
    """
    names = tuple(label_names)
    labels = np.asarray(labels, dtype=np.int64)
    prob = np.asarray(prob, dtype=np.float64)
    if prob.shape != (labels.size, len(names)):
        raise ValueError(f"probabilities of shape {prob.shape} for {labels.size} labels and {len(names)} classes")
    if labels.size == 0:
        raise ValueError("cannot score an empty set")
    if isinstance(threshold, OperatingPoint):
        pred, t = threshold.decide(prob), threshold.threshold
    elif threshold is not None and len(names) == 2:
        t = float(threshold)
        pred = (prob[:, POSITIVE_CLASS] >= t).astype(np.int64)
    else:
        pred, t = prob.argmax(1), None
    c = len(names)
    cm = np.zeros((c, c), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    ece, bins = expected_calibration_error(labels, prob)
    out: dict[str, Any] = {
        "n": int(labels.size),
        "counts": dict(zip(names, map(int, cm.sum(1)))),
        "auc": _finite(roc_auc(labels, prob, num_classes=c)),
        "accuracy": float((pred == labels).mean()),
        "accuracy_argmax": float((prob.argmax(1) == labels).mean()),
        "decision": "threshold" if t is not None and c == 2 else "argmax",
        "threshold": t if c == 2 else None,
    }
    per_class = {}
    for k, name in enumerate(names):
        tp, fn = int(cm[k, k]), int(cm[k].sum() - cm[k, k])
        fp = int(cm[:, k].sum() - cm[k, k])
        tn = int(cm.sum() - tp - fn - fp)
        per_class[name] = {"sensitivity": _rate(tp, tp + fn), "specificity": _rate(tn, tn + fp), "count": tp + fn}
    if c == 2:
        pos = names[POSITIVE_CLASS]
        out.update(positive_class=pos, sensitivity=per_class[pos]["sensitivity"],
                   specificity=per_class[pos]["specificity"])
    else:
        out["per_class"] = per_class
    out["confusion_matrix"] = {"rows": "true", "columns": "predicted", "labels": list(names),
                               "matrix": cm.tolist()}
    out["ece"] = ece
    out["ece_bins"] = bins
    return out
