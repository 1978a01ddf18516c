"""Score a folder of images with a model file; with known labels, also the clinical metrics.

    python -m client.predict MODEL IMAGES --out predictions.csv [--plot roc.png]

IMAGES is an image folder (flat, or one subfolder per class named by label name or index) or a
folder written by `python -m client.import_images`. The CSV has one row per image: `file` (its path
relative to IMAGES), `predicted` (a label name) and one column per label name, spelled as the model
card (and medmnist's INFO) spell them, holding that class's probability. The decision is the card's
threshold (`python -m client.adapt` chose it on the site's support set) for a binary task, argmax
otherwise (or for a model no site has adapted).

When the labels are known (class subfolders, or an imported folder with labels), the metrics are
printed and written beside the CSV (`<out stem>.metrics.json`): AUC, accuracy, sensitivity and
specificity at the threshold, the confusion matrix and the expected calibration error; and one
PNG of the ROC and reliability curves (`--plot`, default `<out stem>.png`). Nothing is sent
anywhere. Images that cannot fit the model (other channel count or size, unreadable files), or a
damaged model file, are reported in one paragraph on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_ERROR = 2


def predict_folder(model_path: str | Path, images_path: str | Path) -> dict[str, Any]:
    """Probabilities and decisions for every image of a folder, and metrics when labels are known."""
    import numpy as np  # noqa: PLC0415

    from common.clinical_metrics import clinical_metrics, predict_probabilities  # noqa: PLC0415
    from common.image_sets import load_image_set  # noqa: PLC0415
    from common.medmnist import MedMNISTData  # noqa: PLC0415
    from common.model_file import load_model_file  # noqa: PLC0415
    from common.threshold import OperatingPoint  # noqa: PLC0415

    mf = load_model_file(model_path)
    info = mf.info
    names = [info.labels[str(i)] for i in range(info.n_classes)]
    images = load_image_set(images_path, info, require_labels=False)
    labels = None if images.labels is None else np.asarray(images.labels, dtype=np.int64)
    data = MedMNISTData(images=images.images, info=info,
                        labels=labels if labels is not None else np.zeros(len(images.files), dtype=np.int64))
    model = mf.build_model()
    prob = predict_probabilities(model, mf.params, data)
    point = OperatingPoint.from_json(mf.threshold, task=info.task, label_names=names, fixed_rule=mf.decision_rule)
    pred = point.decide(prob)
    metrics = None if labels is None else clinical_metrics(labels, prob, point, names)
    return {"files": list(images.files), "names": names, "prob": prob, "pred": pred, "labels": labels,
            "point": point, "metrics": metrics, "card": mf.card}


def write_csv(path: Path, files: Sequence[str], names: Sequence[str], prob, pred) -> None:
    from common.files import atomic_write  # noqa: PLC0415

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "predicted", *names])
    for f, p, k in zip(files, prob, pred):
        w.writerow([f, names[int(k)], *(f"{float(v):.8g}" for v in p)])
    with atomic_write(path, "w") as fh:
        fh.write(buf.getvalue())


def _summary(m: dict[str, Any]) -> str:
    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    lines = [f"{m['n']} images with labels ({', '.join(f'{k}: {v}' for k, v in m['counts'].items())})",
             f"AUC {f(m['auc'])}   accuracy {f(m['accuracy'])} (decision: "
             + (f"{m['positive_class']} when p >= {m['threshold']:.4f}" if m["threshold"] is not None else "argmax")
             + f")   ECE {m['ece']:.4f}"]
    if "sensitivity" in m:
        lines.append(f"sensitivity ({m['positive_class']}) {f(m['sensitivity'])}   specificity {f(m['specificity'])}")
    else:
        for name, r in m["per_class"].items():
            lines.append(f"  {name}: sensitivity {f(r['sensitivity'])}, specificity {f(r['specificity'])}")
    cm = m["confusion_matrix"]
    lines.append("confusion matrix (rows: true, columns: predicted; " + " | ".join(cm["labels"]) + "):")
    lines += ["  " + " ".join(f"{v:6d}" for v in row) for row in cm["matrix"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.predict",
                                     description="Score a folder of images with a model file (nothing leaves the "
                                                 "machine).")
    parser.add_argument("model", help="the model file (model.safetensors, usually adapted by client.adapt)")
    parser.add_argument("images", help="an image folder (flat or class subfolders) or an imported folder")
    parser.add_argument("--out", required=True, help="the CSV to write (one row per image)")
    parser.add_argument("--plot", default=None, help="PNG of the ROC and reliability curves when labels are known "
                                                     "(default: <out stem>.png)")
    args = parser.parse_args(argv)

    from common.medmnist import DataError  # noqa: PLC0415 - keep --help fast
    from common.model_file import ModelFileError  # noqa: PLC0415
    from common.roc_reliability_plot import plot_roc_reliability  # noqa: PLC0415
    from common.threshold import OperatingPointError  # noqa: PLC0415

    out = Path(args.out).expanduser()
    try:
        r = predict_folder(args.model, args.images)
        write_csv(out, r["files"], r["names"], r["prob"], r["pred"])
        m = r["metrics"]
        if m is not None:
            from common.files import atomic_write, json_safe  # noqa: PLC0415

            plot = Path(args.plot).expanduser() if args.plot else out.with_suffix(".png")
            metrics_path = out.with_suffix(".metrics.json")
            weights = (r["card"].get("weights") or {}).get("sha256")
            payload = {"model": str(Path(args.model).resolve()), "model_weights_sha256": weights,
                       "images": str(Path(args.images).resolve()), "decision_rule": r["point"].to_json(), **m}
            with atomic_write(metrics_path, "w") as fh:
                json.dump(json_safe(payload), fh, indent=2, allow_nan=False)
                fh.write("\n")
            plot_roc_reliability(plot, r["labels"], r["prob"], label_names=r["names"], threshold=r["point"],
                                 title=f"{r['card']['dataset']['flag']}: {m['n']} images", metrics=m)
    except (ModelFileError, DataError, OperatingPointError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{len(r['files'])} images scored -> {out.resolve()}")
    if m is None:
        print("no labels (flat folder): no metrics" + (", no plot" if args.plot else ""))
    else:
        print(_summary(m))
        print(f"metrics -> {metrics_path.resolve()}\nplot -> {plot.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
