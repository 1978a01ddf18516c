"""Adapt a released model to this hospital on its labelled cases, and choose its decision threshold.

    python -m client.adapt MODEL SUPPORT --out ADAPTED [--prevalence P] [--method M --lr LR --steps S]
                           [--max-grad-norm C] [--force]

MODEL is a model file (`model.safetensors`); SUPPORT the site's labelled support set: a folder
written by `python -m client.import_images`, or an image folder with one subfolder per class (named
by the label names or indices of the model's dataset), imported on the fly. The weights are adapted
exactly as the federation's held-out hospitals adapt them (`common.adaptation.adapt_params`, the
`finetune` call of `common.held_out.adapt_and_score`) with the card's chosen adaptation unless
overridden; the threshold is chosen on the support set alone (`common.threshold`:
cross-validated Youden's J, or the Bayes threshold for a stated `--prevalence`). ADAPTED is a new
model file whose card records the threshold and a "site adaptation" history step (method, lr,
steps, support counts per class, the support set's SHA-256, the threshold record, time).

Nothing is sent anywhere. Bad input (a damaged or foreign model file, images of another dataset or
that do not fit the model, an unlabelled or single-class support set) is reported in one paragraph
on stderr with exit code 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_ERROR = 2
ADAPT_STEP = "site adaptation"


@dataclass(frozen=True)
class SiteAdaptation:
    """What `adapt_model_file` produced (also written to the output file)."""

    params: dict
    card: dict[str, Any]
    threshold: Any  # common.threshold.OperatingPoint
    method: str
    lr: float
    steps: int
    max_grad_norm: float
    counts: dict[str, int]
    support_sha256: str


def support_sha256(images, labels) -> str:
    """SHA-256 of a labelled image set: a JSON header of shapes and dtypes, the uint8 image bytes
    (C order), then the labels as little-endian int64."""
    import numpy as np  # noqa: PLC0415

    img = np.ascontiguousarray(images, dtype=np.uint8)
    lab = np.ascontiguousarray(labels, dtype="<i8")
    head = json.dumps({"images": list(img.shape), "dtype": "uint8", "labels": list(lab.shape)},
                      separators=(",", ":")).encode()
    digest = hashlib.sha256(head)
    digest.update(img.tobytes())
    digest.update(lab.tobytes())
    return digest.hexdigest()


def card_adaptation(card: dict[str, Any], *, method: str | None = None, lr: float | None = None,
                    steps: int | None = None, max_grad_norm: float | None = None) -> tuple[str, float, int, float]:
    """(method, lr, steps, max_grad_norm): the card's chosen adaptation, each overridable.

    The clip norm of ``clipped-sgd`` is the run's `max-grad-norm` (as in `adapt_and_score`).
    """
    chosen = card.get("adaptation") or {}
    config = (card.get("training") or {}).get("config") or {}
    m = method if method is not None else str(chosen["method"])
    r = float(lr if lr is not None else chosen["lr"])
    s = int(steps if steps is not None else chosen["steps"])
    c = max_grad_norm if max_grad_norm is not None else chosen.get("max_grad_norm", config.get("max-grad-norm", 1.0))
    return m, r, s, float(c)


def parse_prevalence(text: str | None) -> float | tuple[float, ...] | None:
    """``0.3`` (binary: the positive class) or ``0.2,0.3,0.5`` (one per class, in label order)."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--prevalence {text!r}: give a number such as 0.3, or one per class such as "
                         "0.2,0.3,0.5") from None
    if not values:
        raise ValueError("--prevalence is empty")
    return values[0] if len(values) == 1 else tuple(values)


def adapt_model_file(
    model_path: str | Path,
    support_path: str | Path,
    *,
    prevalence: float | Sequence[float] | None = None,
    method: str | None = None,
    lr: float | None = None,
    steps: int | None = None,
    max_grad_norm: float | None = None,
) -> SiteAdaptation:
    """Load, adapt, choose the threshold; returns the adapted weights and their card (nothing written)."""
    import numpy as np  # noqa: PLC0415

    from common.adaptation import adapt_params  # noqa: PLC0415
    from common.config import ADAPT_METHODS  # noqa: PLC0415
    from common.image_sets import load_image_set  # noqa: PLC0415
    from common.medmnist import MedMNISTData  # noqa: PLC0415
    from common.model_file import append_history, load_model_file  # noqa: PLC0415
    from common.threshold import OperatingPointError, choose_threshold  # noqa: PLC0415

    mf = load_model_file(model_path)
    info = mf.info
    m, r, s, c = card_adaptation(mf.card, method=method, lr=lr, steps=steps, max_grad_norm=max_grad_norm)
    if m not in (*ADAPT_METHODS, "none"):
        raise ValueError(f"adaptation method {m!r} is unknown; use one of {', '.join(ADAPT_METHODS)} or none")
    if s < 0 or not np.isfinite(r) or r < 0 or not c > 0:
        raise ValueError(f"adaptation steps={s}, lr={r}, max-grad-norm={c}: steps and lr must be >= 0 and the clip "
                         "norm > 0")
    images = load_image_set(support_path, info, require_labels=True)
    if images.labels is None:  # load_image_set(require_labels=True) refuses these already
        raise OperatingPointError(f"{support_path}: the support set has no labels")
    names = [info.labels[str(i)] for i in range(info.n_classes)]
    labels = np.asarray(images.labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=info.n_classes)
    if np.count_nonzero(counts) < 2:
        only = names[int(np.argmax(counts))]
        raise OperatingPointError(
            f"{support_path}: all {len(labels)} support cases are {only!r}. Adapting on one class teaches the model "
            f"only that class, and a threshold needs both sides: add labelled cases of the other class"
            f"{'es' if info.n_classes > 2 else ''} ({', '.join(n for n in names if n != only)}).")
    x, y = MedMNISTData(images=images.images, labels=labels, info=info).to_tensor()
    model = mf.build_model()
    point = choose_threshold(model, mf.params, x, y, task=info.task, label_names=names, method=m, lr=r, steps=s,
                             max_grad_norm=c, prevalence=prevalence, groups=images.patient_ids)
    phi = adapt_params(model, mf.params, x, y, method=m, lr=r, steps=s, max_grad_norm=c)
    count_map = {names[i]: int(counts[i]) for i in range(info.n_classes)}
    digest = support_sha256(images.images, labels)
    record = point.to_json()
    details: dict[str, Any] = {"method": m, "lr": r, "steps": s}
    if m == "clipped-sgd":
        details["max_grad_norm"] = c
    details["support"] = {"records": int(len(labels)), "counts": count_map, "sha256": digest,
                          "hash": "SHA-256 over a shape header, uint8 images, int64 labels"}
    details["threshold"] = record
    card = append_history(mf.card, ADAPT_STEP, **details)
    card["threshold"] = record
    return SiteAdaptation(phi, card, point, m, r, s, c, count_map, digest)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.adapt",
                                     description="Adapt a model file to this site's labelled cases and choose its "
                                                 "decision threshold (nothing leaves the machine).")
    parser.add_argument("model", help="the model file (model.safetensors)")
    parser.add_argument("support", help="labelled support set: an imported folder or a folder of class subfolders")
    parser.add_argument("--out", required=True, help="the adapted model file to write")
    parser.add_argument("--prevalence", default=None, metavar="P",
                        help="the prevalence of the positive class (label 1) at this site, e.g. 0.3; or one per "
                             "class, comma-separated. Default: cross-validated Youden threshold (binary), argmax")
    parser.add_argument("--method", default=None, help="override the card's adaptation method "
                                                       "(sgd, clipped-sgd, adam, none)")
    parser.add_argument("--lr", type=float, default=None, help="override the card's adaptation learning rate")
    parser.add_argument("--steps", type=int, default=None, help="override the card's adaptation steps")
    parser.add_argument("--max-grad-norm", type=float, default=None,
                        help="clip norm of clipped-sgd (default: the run's max-grad-norm)")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = parser.parse_args(argv)

    from common.medmnist import DataError  # noqa: PLC0415 - keep --help fast
    from common.model_file import ModelFileError, save_model_file  # noqa: PLC0415
    from common.threshold import OperatingPointError  # noqa: PLC0415

    out = Path(args.out).expanduser()
    try:
        if out.exists() and not args.force:
            raise FileExistsError(f"{out} exists; choose another --out or pass --force to replace it")
        if out.exists() and not out.is_file():
            raise FileExistsError(f"{out} exists and is not a file; choose another --out")
        result = adapt_model_file(args.model, args.support, prevalence=parse_prevalence(args.prevalence),
                                  method=args.method, lr=args.lr, steps=args.steps, max_grad_norm=args.max_grad_norm)
        save_model_file(out, result.params, result.card)
    except (ModelFileError, DataError, OperatingPointError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    p = result.threshold
    print(f"adapted on {sum(result.counts.values())} support cases "
          f"({', '.join(f'{k}: {v}' for k, v in result.counts.items())}) with {result.method}, lr={result.lr:g}, "
          f"steps={result.steps}")
    if p.threshold is not None:
        cv = (f"; out-of-fold ({p.folds} folds) AUC {p.oof_auc:.3f}, sensitivity {p.sensitivity:.3f}, "
              f"specificity {p.specificity:.3f}" if p.folds and p.sensitivity is not None else "")
        print(f"threshold: {p.label_names[1]} when its probability >= {p.threshold:.4f} (rule {p.rule}){cv}")
    else:
        print(f"decision: {p.to_json()['decision']} (rule {p.rule})")
    if p.note:
        print(f"note: {p.note}")
    print(f"wrote {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
