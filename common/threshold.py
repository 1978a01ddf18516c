"""A site's operating point: how it turns class probabilities into a decision.

The decision threshold is chosen from the site's labelled support set alone, never from the cases
it will be judged on:

- binary tasks, by default: stratified k-fold cross-validation on the support set (k = min(5,
  smallest class count)). Each fold adapts theta on the other folds exactly as the site adapts
  (`common.adaptation.adapt_params`: same method, lr, steps), scores the held-out fold, and the
  out-of-fold probabilities of the positive class (class 1, as MedMNIST's AUC) give the
  threshold maximising Youden's J = sensitivity + specificity - 1 (Youden 1950; Fluss et al. 2005);
- binary tasks with a prevalence the site states: the Bayes threshold for that prevalence,
  correcting the support set's class balance (prior shift, Saerens et al. 2002: the posterior
  odds scale by the ratio of the prior odds). With fewer than 2 support records per class no
  cross-validation is possible; then this rule is used with the stated prevalence, or with the
  support set's own balance (threshold 0.5) when none is stated, and the record says so;
- multi-class and ordinal tasks: argmax, optionally prior-corrected with stated per-class prevalences.

`OperatingPoint` records the rule and the figures it rests on; it is stored in the model card
(`"threshold"`) and applied by `decide`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from common.adaptation import adapt_params
from common.maml import Params, class_probabilities, predict_logits, roc_auc

__all__ = [
    "OperatingPoint", "OperatingPointError", "argmax_point", "bayes_threshold", "choose_threshold",
    "out_of_fold_probabilities", "stratified_folds", "youden_threshold",
]

BINARY_TASK = "binary-class"
POSITIVE_CLASS = 1  # the class whose probability MedMNIST's binary AUC ranks

RULE_YOUDEN_CV = "youden-cv"             # binary: max Youden's J on out-of-fold probabilities
RULE_PREVALENCE = "prevalence"           # binary: Bayes threshold for a stated prevalence
RULE_SUPPORT_BALANCE = "support-balance"  # binary fallback: 0.5 (Bayes for the support set's own balance)
RULE_ARGMAX = "argmax"                   # multi-class / ordinal
RULE_ARGMAX_PREVALENCE = "argmax-prevalence"  # multi-class / ordinal, prior-corrected

MAX_FOLDS = 5


class OperatingPointError(ValueError):
    """The support set or the stated prevalence cannot give a decision rule (the message says why)."""


@dataclass(frozen=True)
class OperatingPoint:
    """How a site turns class probabilities into a decision, and what the choice rests on.

    Binary: predict ``label_names[1]`` when P(class 1) >= `threshold`. Multi-class: argmax of the
    probabilities times `class_weights` (all 1 without stated prevalences). The figures
    (`oof_auc`, `youden_j`, `sensitivity`, `specificity`) are out-of-fold estimates on the support
    set, None where no cross-validation ran.
    """

    rule: str
    task: str
    label_names: tuple[str, ...]
    support_counts: tuple[int, ...]
    threshold: float | None = None
    class_weights: tuple[float, ...] | None = None
    prevalence: tuple[float, ...] | None = None  # stated, per class
    folds: int = 0
    fold_seed: int | None = None
    by_patient: bool = False  # folds kept each patient's records together
    oof_auc: float | None = None
    youden_j: float | None = None
    sensitivity: float | None = None
    specificity: float | None = None
    note: str = ""

    @property
    def binary(self) -> bool:
        return len(self.label_names) == 2

    def decide(self, prob: np.ndarray) -> np.ndarray:
        """Predicted class index per row of `prob` (n, classes)."""
        prob = np.asarray(prob, dtype=np.float64)
        if prob.ndim != 2 or prob.shape[1] != len(self.label_names):
            raise ValueError(f"expected probabilities of shape (n, {len(self.label_names)}), got {prob.shape}")
        if self.binary and self.threshold is not None:
            return (prob[:, POSITIVE_CLASS] >= self.threshold).astype(np.int64)
        weights = np.asarray(self.class_weights if self.class_weights is not None else np.ones(prob.shape[1]))
        return (prob * weights).argmax(1).astype(np.int64)

    def to_json(self) -> dict[str, Any]:
        """The card's "threshold" record (keys by label index, as the card's dataset labels)."""
        idx = [str(i) for i in range(len(self.label_names))]
        out: dict[str, Any] = {"rule": self.rule, "chosen_on": self.chosen_on(), "task": self.task}
        if self.binary and self.threshold is not None:
            pos = self.label_names[POSITIVE_CLASS]
            out.update({"score": f"softmax probability of label {POSITIVE_CLASS}",
                        "positive_class": str(POSITIVE_CLASS), "positive_name": pos, "threshold": self.threshold,
                        "decision": f"label {POSITIVE_CLASS} ({pos}) when its probability >= {self.threshold:.6g}"})
        else:
            out["decision"] = ("argmax of the softmax probabilities" if self.class_weights is None else
                               "argmax of the softmax probabilities times class_weights")
        out["support_counts"] = dict(zip(idx, map(int, self.support_counts)))
        if self.class_weights is not None:
            out["class_weights"] = dict(zip(idx, self.class_weights))
        if self.prevalence is not None:
            out["prevalence"] = dict(zip(idx, self.prevalence))
        if self.folds:
            out["cross_validation"] = {
                "folds": self.folds, "fold_seed": self.fold_seed, "stratified": True,
                "by_patient": self.by_patient,
                "out_of_fold_auc": _finite(self.oof_auc), "youden_j": _finite(self.youden_j),
                "sensitivity": _finite(self.sensitivity), "specificity": _finite(self.specificity),
            }
        if self.note:
            out["note"] = self.note
        return out

    def chosen_on(self) -> str:
        if self.rule == RULE_YOUDEN_CV:
            return (f"the site's support set: out-of-fold probabilities of {self.folds}-fold stratified "
                    "cross-validation, each fold adapted as the site adapts; maximum Youden's J")
        if self.rule == RULE_PREVALENCE:
            return "the stated prevalence, correcting the support set's class balance (Bayes threshold)"
        if self.rule == RULE_SUPPORT_BALANCE:
            return "the support set's own class balance (too few cases per class to cross-validate)"
        if self.rule == RULE_ARGMAX_PREVALENCE:
            return "the stated prevalences, correcting the support set's class balance"
        return "fixed rule (argmax)"

    @classmethod
    def from_json(cls, raw: Mapping[str, Any] | None, *, task: str, label_names: Sequence[str],
                  fixed_rule: Mapping[str, Any] | None = None) -> OperatingPoint:
        """The card's "threshold" record as written by `to_json`, checked against the model's labels.

        Without one (a model no site has adapted) the card's fixed `decision_rule`: its
        ``probability_threshold`` for a binary task, else argmax.
        """
        names = tuple(label_names)
        if raw is None:
            t = (fixed_rule or {}).get("probability_threshold") if len(names) == 2 else None
            return argmax_point(task, names, threshold=None if t is None else float(t))
        idx = [str(i) for i in range(len(names))]
        try:
            counts = raw["support_counts"]
            if sorted(counts) != sorted(idx):
                raise ValueError(f"its classes {sorted(counts)} are not the model's {idx}")
            threshold = raw.get("threshold")
            if threshold is not None:
                threshold = float(threshold)
                if len(names) != 2 or not 0.0 <= threshold <= 1.0:
                    raise ValueError(f"threshold {threshold} is not a probability of a binary task")
            weights = raw.get("class_weights")
            prevalence = raw.get("prevalence")
            cv = raw.get("cross_validation") or {}
            return cls(
                rule=str(raw["rule"]), task=task, label_names=names,
                support_counts=tuple(int(counts[i]) for i in idx), threshold=threshold,
                class_weights=None if weights is None else tuple(float(weights[i]) for i in idx),
                prevalence=None if prevalence is None else tuple(float(prevalence[i]) for i in idx),
                folds=int(cv.get("folds", 0)), fold_seed=cv.get("fold_seed"), by_patient=bool(cv.get("by_patient")),
                oof_auc=cv.get("out_of_fold_auc"), youden_j=cv.get("youden_j"),
                sensitivity=cv.get("sensitivity"), specificity=cv.get("specificity"), note=str(raw.get("note", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise OperatingPointError(f"the model card's threshold record is not valid ({exc!s})") from exc


def argmax_point(task: str, label_names: Sequence[str], *, threshold: float | None = None) -> OperatingPoint:
    """The rule of a model that no site has adapted: argmax (or, binary, the card's fixed threshold)."""
    names = tuple(label_names)
    return OperatingPoint(rule=RULE_ARGMAX, task=task, label_names=names, support_counts=(0,) * len(names),
                          threshold=threshold, note="no site threshold in the model card: its fixed decision rule")


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def bayes_threshold(*, support_prevalence: float, prevalence: float) -> float:
    """The threshold on P(positive) of a model whose posteriors reflect `support_prevalence`, for a
    population with `prevalence`: the corrected posterior odds ``odds * (p/(1-p)) / (pi/(1-pi))``
    reach 1 at ``t = pi (1-p) / (pi (1-p) + p (1-pi))`` (0.5 when p = pi)."""
    pi, p = float(support_prevalence), float(prevalence)
    for name, v in (("support prevalence", pi), ("prevalence", p)):
        if not 0.0 < v < 1.0:
            raise OperatingPointError(f"the {name} must be strictly between 0 and 1, got {v}")
    return pi * (1 - p) / (pi * (1 - p) + p * (1 - pi))


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float, float, float]:
    """(threshold, J, sensitivity, specificity) maximising Youden's J for "positive when score >= t".

    Between two consecutive distinct scores every threshold gives the same decisions, so the
    optimum is a range; the threshold is the midpoint of that range (outer bounds 0 and 1). When
    separate ranges tie, the one nearest the middle of the first and last is taken (lower on a tie).
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise OperatingPointError("Youden's J needs both classes among the scored records")
    u = np.unique(scores)
    # cut i predicts positive for scores >= u[i] (i = 0..m-1) or for none (i = m); its range of
    # thresholds is (u[i-1], u[i]] with u[-1] = 0, and (u[m-1], 1] for the last
    lower = np.concatenate([[0.0], u])
    upper = np.concatenate([u, [1.0]])
    js = []
    for i in range(u.size + 1):
        pred = scores >= u[i] if i < u.size else np.zeros_like(labels)
        js.append(float((pred & labels).sum()) / n_pos + float((~pred & ~labels).sum()) / n_neg - 1.0)
    js_arr = np.asarray(js)
    if u[-1] >= 1.0:  # "none positive" cannot be written as a threshold <= 1
        js_arr[-1] = -np.inf
    best = np.flatnonzero(js_arr >= js_arr.max() - 1e-12)
    runs = np.split(best, np.flatnonzero(np.diff(best) > 1) + 1)
    mids = np.array([(lower[r[0]] + upper[r[-1]]) / 2 for r in runs])
    centre = (mids[0] + mids[-1]) / 2
    k = int(np.argmin(np.abs(mids - centre)))
    t = float(mids[k])
    pred = scores >= t
    se = float((pred & labels).sum()) / n_pos
    sp = float((~pred & ~labels).sum()) / n_neg
    return t, se + sp - 1.0, se, sp


def stratified_folds(labels: np.ndarray, *, groups: Sequence[str] | None = None, max_folds: int = MAX_FOLDS,
                     seed: int = 0) -> list[np.ndarray]:
    """Held-out index sets of stratified k-fold; [] when k < 2.

    The units dealt to folds are records, or with `groups` (patient ids) whole patients, so that no
    patient has records on both sides of a fold (a patient counts for the label of its first
    record). k = min(max_folds, the smallest number of units of a class). Each class's units, in a
    seeded random order, are dealt to the folds in turn: every fold holds each class in proportion.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        return []
    if groups is None:
        unit_of = np.arange(labels.size)
    else:
        if len(groups) != labels.size:
            raise ValueError(f"{len(groups)} patient ids for {labels.size} records")
        _, unit_of = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    n_units = int(unit_of.max()) + 1
    first = np.full(n_units, labels.size)
    np.minimum.at(first, unit_of, np.arange(labels.size))
    unit_label = labels[first]
    counts = np.bincount(unit_label)
    k = min(int(max_folds), int(counts[counts > 0].min()))
    if k < 2:
        return []
    rng = np.random.default_rng(seed)
    fold_of_unit = np.empty(n_units, dtype=np.int64)
    start = 0
    for c in np.flatnonzero(counts):
        units = rng.permutation(np.flatnonzero(unit_label == c))
        fold_of_unit[units] = (start + np.arange(units.size)) % k  # continue the deal where the last class stopped
        start = (start + units.size) % k
    fold_of = fold_of_unit[unit_of]
    return [np.flatnonzero(fold_of == f) for f in range(k)]


def out_of_fold_probabilities(
    model: nn.Module, theta: Params, x: torch.Tensor, y: torch.Tensor, folds: Sequence[np.ndarray], *,
    method: str, lr: float, steps: int, max_grad_norm: float,
) -> np.ndarray:
    """Class probabilities of every support record from theta adapted on the other folds only."""
    prob = np.full((y.shape[0], 0), np.nan)
    for held in folds:
        keep = np.ones(y.shape[0], dtype=bool)
        keep[held] = False
        train = torch.as_tensor(np.flatnonzero(keep))
        phi = adapt_params(model, theta, x[train], y[train], method=method, lr=lr, steps=steps,
                           max_grad_norm=max_grad_norm)
        p = class_probabilities(predict_logits(model, phi, x[torch.as_tensor(held)]))
        if prob.shape[1] == 0:
            prob = np.full((y.shape[0], p.shape[1]), np.nan)
        prob[held] = p
    return prob


def _prevalence_vector(prevalence: float | Sequence[float], n_classes: int) -> tuple[float, ...]:
    if isinstance(prevalence, (int, float)):
        if n_classes != 2:
            raise OperatingPointError(
                f"a single prevalence applies to a binary task; this one has {n_classes} classes: state one "
                "prevalence per class (in label order, summing to 1)")
        p = float(prevalence)
        if not 0.0 < p < 1.0:
            raise OperatingPointError(f"the prevalence must be strictly between 0 and 1, got {p}")
        return (1.0 - p, p)
    vec = tuple(float(v) for v in prevalence)
    if len(vec) != n_classes:
        raise OperatingPointError(f"{len(vec)} prevalences given for {n_classes} classes; give one per class")
    if any(not 0.0 < v < 1.0 for v in vec) or abs(sum(vec) - 1.0) > 1e-6:
        raise OperatingPointError(f"prevalences {list(vec)} must each lie in (0, 1) and sum to 1")
    return vec


def choose_threshold(
    model: nn.Module,
    theta: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    task: str,
    label_names: Sequence[str],
    method: str,
    lr: float,
    steps: int,
    max_grad_norm: float,
    prevalence: float | Sequence[float] | None = None,
    groups: Sequence[str] | None = None,
    max_folds: int = MAX_FOLDS,
    seed: int = 0,
) -> OperatingPoint:
    """The site's decision rule from its support set (x, y) alone (see the module docstring).

    `theta` is the initialisation the site adapts (not the adapted weights): each fold adapts it
    with the site's own adaptation (`method`, `lr`, `steps`, `max_grad_norm`). `prevalence`: for a
    binary task the stated prevalence of the positive class (class 1), or per class. `groups`:
    patient ids of the records, if known (folds then keep each patient's records together).
    """
    names = tuple(label_names)
    n_classes = len(names)
    labels = y.numpy().astype(np.int64)
    counts = tuple(int(c) for c in np.bincount(labels, minlength=n_classes))
    if len(counts) != n_classes:
        raise OperatingPointError(f"support labels go up to {labels.max()}, but the model has {n_classes} classes")
    stated = None if prevalence is None else _prevalence_vector(prevalence, n_classes)
    base = dict(task=task, label_names=names, support_counts=counts, prevalence=stated)

    if n_classes != 2:
        if stated is None:
            return OperatingPoint(rule=RULE_ARGMAX, **base)
        missing = [names[c] for c in range(n_classes) if counts[c] == 0]
        if missing:
            raise OperatingPointError(
                f"cannot correct for stated prevalences: the support set has no {', '.join(missing)} case, so its "
                "class balance is unknown for that class; add such cases or state no prevalences")
        pi = np.asarray(counts, dtype=np.float64) / sum(counts)
        w = np.asarray(stated) / pi
        return OperatingPoint(rule=RULE_ARGMAX_PREVALENCE, class_weights=tuple(float(v) for v in w / w.max()),
                              note="argmax of probabilities reweighted by stated prevalence / support share", **base)

    if min(counts) == 0:
        have = names[int(np.argmax(counts))]
        raise OperatingPointError(
            f"the support set holds only {have!r} cases ({counts[int(np.argmax(counts))]}); a threshold needs "
            f"both classes ({' and '.join(repr(n) for n in names)}): add labelled cases of the other class")
    pi = counts[POSITIVE_CLASS] / sum(counts)
    folds = stratified_folds(labels, groups=groups, max_folds=max_folds, seed=seed)
    cv: dict[str, Any] = {}
    if folds:
        oof = out_of_fold_probabilities(model, theta, x, y, folds, method=method, lr=lr, steps=steps,
                                        max_grad_norm=max_grad_norm)
        score = oof[:, POSITIVE_CLASS]
        t_j, j, se, sp = youden_threshold(labels == POSITIVE_CLASS, score)
        cv = dict(folds=len(folds), fold_seed=seed, by_patient=groups is not None,
                  oof_auc=roc_auc(labels, oof, num_classes=2))
    if stated is not None or not folds:
        p = stated[POSITIVE_CLASS] if stated is not None else pi
        t = bayes_threshold(support_prevalence=pi, prevalence=p)
        note = ""
        if not folds:
            note = (f"fewer than 2 support {'patients' if groups is not None else 'cases'} in a class "
                    f"({dict(zip(names, counts))} cases): no cross-validation; "
                    + ("Bayes threshold for the stated prevalence" if stated is not None else
                       "threshold 0.5 (the support set's own balance); state --prevalence to correct it"))
        if folds:  # out-of-fold figures at this threshold
            pred = score >= t
            pos = labels == POSITIVE_CLASS
            se = float((pred & pos).sum() / pos.sum())
            sp = float((~pred & ~pos).sum() / (~pos).sum())
            cv.update(youden_j=se + sp - 1.0, sensitivity=se, specificity=sp)
        return OperatingPoint(rule=RULE_PREVALENCE if stated is not None else RULE_SUPPORT_BALANCE, threshold=t,
                              note=note, **cv, **base)
    return OperatingPoint(rule=RULE_YOUDEN_CV, threshold=t_j, youden_j=j, sensitivity=se, specificity=sp,
                          **cv, **base)
