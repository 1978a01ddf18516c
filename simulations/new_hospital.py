"""A new hospital takes the released model into use: import its images, adapt on K labelled cases per
class, predict the rest. Measures the figures and the time of that step, end to end.

    python -m simulations.new_hospital --work DIR [--data-dir PATH] [--dataset pneumoniamnist] [--shots 10]
                                       [--seed 0] [--model MODEL] [--run-config "k=v ..."] [--prevalence P]

1. Training data without the test split: `DIR/data/<dataset>.npz` is the official file with its test
   arrays emptied (shape (0, ...); `common.medmnist` pools the splits, so an empty split adds no record).
   No test image is seen in training, in the validation hospitals' choice of adaptation, or in the
   run's held-out scores.
2. Training (skipped with `--model`): the project's default run config with only the data, dataset
   and results folder overridden (plus `--run-config`),
   ``python -m simulations.run --run-config "data-dir='DIR/data' dataset='<dataset>' results-dir='DIR/results'"``,
   which writes `DIR/results/model.safetensors`.
3. The official test split, exported as a hospital would hold it: PNG files in class folders named as
   medmnist spells the labels; `shots` per class (a seeded draw) in `DIR/site/support/`, the rest in
   `DIR/site/rest/`. Identical images are kept once (PneumoniaMNIST's test split holds 3 pairs).
4. The timed step, each command its own process, as a hospital runs them: `client.import_images`
   for the support set and for the rest, `client.adapt` (the card's adaptation; the threshold by
   cross-validation on the support set, or for `--prevalence`), `client.predict` on the rest. Wall
   time of each and in total.
5. For reference (not timed): the released model as is (no adaptation, argmax) on the same images.

Writes `DIR/new_hospital.json` (figures, timings, the commands, the targets) and prints a summary.
Exit 0 when every target is met, 1 when one is missed, 2 on bad arguments or a failed command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "medmnist"
TARGETS = {"auc": 0.93, "accuracy": 0.85, "seconds": 30.0}  # the targets (PneumoniaMNIST, K=10)


def without_test_split(src: Path, dst: Path) -> dict[str, int]:
    """Copy an official .npz with empty test arrays; returns the split sizes written."""
    with np.load(src, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["test_images"] = arrays["test_images"][:0]
    arrays["test_labels"] = arrays["test_labels"][:0]
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    return {s: int(arrays[f"{s}_labels"].shape[0]) for s in ("train", "val", "test")}


def export_test_split(src: Path, site: Path, names: Sequence[str], *, shots: int, seed: int) -> dict[str, Any]:
    """The official test images as PNG class folders: `shots` per class in support/, the rest in rest/."""
    from PIL import Image

    with np.load(src, allow_pickle=False) as f:
        images, labels = f["test_images"], f["test_labels"].reshape(-1).astype(np.int64)
    # Identical images (PneumoniaMNIST's test split has 3 pairs, same label) are kept once: the
    # importer refuses duplicates, and a copy on both sides of the split would score a case adapted on.
    first: dict[bytes, int] = {}
    keep = np.zeros(labels.size, dtype=bool)
    for i, img in enumerate(images):
        j = first.setdefault(img.tobytes(), i)
        keep[i] = j == i
        if j != i and labels[j] != labels[i]:
            keep[j] = False  # copies labelled differently: none is used
    rng = np.random.default_rng(seed)
    support = np.zeros(labels.size, dtype=bool)
    for c in range(len(names)):
        idx = np.flatnonzero(keep & (labels == c))
        support[rng.choice(idx, size=min(shots, idx.size), replace=False)] = True
    for i in np.flatnonzero(keep):
        folder = site / ("support" if support[i] else "rest") / names[labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"test-{i:04d}.png")
    rest = keep & ~support
    return {"test_records": int(labels.size), "duplicates_left_out": int((~keep).sum()),
            "support": {names[c]: int((support & (labels == c)).sum()) for c in range(len(names))},
            "rest": {names[c]: int((rest & (labels == c)).sum()) for c in range(len(names))}}


def run(cmd: list[str], *, log: Path) -> float:
    """Run one command as its own process (output to `log`); its wall time in seconds."""
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        done = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"command failed (exit {done.returncode}): {shlex.join(cmd)}; see {log}")
    return seconds


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations.new_hospital", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="working folder (created; must not hold a previous site/)")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA),
                        help="folder of the official .npz (default: %(default)s)")
    parser.add_argument("--dataset", default="pneumoniamnist")
    parser.add_argument("--shots", type=int, default=10, help="labelled support cases per class (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the support draw (default: %(default)s)")
    parser.add_argument("--model", default=None, help="use this model file instead of training one")
    parser.add_argument("--run-config", default="", help="extra overrides for the training run (k=v ...)")
    parser.add_argument("--prevalence", default=None,
                        help="passed to client.adapt (the site's stated prevalence); default: Youden's J by "
                             "cross-validation on the support set")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    from common.medmnist import DataError, dataset_info, npz_path

    work = Path(args.work).expanduser().resolve()
    site = work / "site"
    try:
        info = dataset_info(args.dataset, 28)
        official = npz_path(info.flag, args.data_dir, 28)
        if not official.is_file():
            raise DataError(f"{official} not found; pass --data-dir with the official {official.name}")
        if site.exists():
            raise DataError(f"{site} exists: use a new --work folder (or remove {site})")
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    names = [info.labels[str(i)] for i in range(info.n_classes)]
    work.mkdir(parents=True, exist_ok=True)
    log = work / "new_hospital.log"
    report: dict[str, Any] = {"dataset": info.flag, "shots_per_class": args.shots, "seed": args.seed,
                              "prevalence": args.prevalence,
                              "targets": TARGETS, "cores": os.cpu_count()}
    try:
        if args.model:
            model = Path(args.model).expanduser().resolve()
            report["training"] = {"model": str(model), "trained_here": False}
        else:
            training_copy = npz_path(info.flag, work / "data", 28)
            model, report["training"] = _train_model(args, official, training_copy, info.flag, work, log=log)
        report["export"] = export_test_split(official, site, names, shots=args.shots, seed=args.seed)
        _take_into_use(model, site, info.flag, args.prevalence, report, log=log)
    except (RuntimeError, OSError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    after, before, met = _score_against_targets(report, site)
    with open(work / "new_hospital.json", "w") as fh:
        json.dump(report, fh, indent=2)
        fh.write("\n")
    _print_results(info.flag, report, after, before, met, work)
    return 0 if all(met.values()) else 1


def _train_model(args: argparse.Namespace, official: Path, training_copy: Path, flag: str, work: Path, *,
                 log: Path) -> tuple[Path, dict[str, Any]]:
    """A training run on a copy of the data without its test split; the model file and what was done."""
    data = training_copy.parent
    splits = without_test_split(official, training_copy)
    results = work / "results"
    overrides = f"data-dir='{data}' dataset='{flag}' results-dir='{results}' {args.run_config}".strip()
    cmd = [sys.executable, "-m", "simulations.run", "--run-config", overrides]
    seconds = run(cmd, log=log)
    model = results / "model.safetensors"
    return model, {"model": str(model), "trained_here": True, "command": shlex.join(cmd),
                   "seconds": round(seconds, 1), "splits_used": splits,
                   "test_split": "emptied in the training copy (shape (0, ...))"}


def _take_into_use(model: Path, site: Path, flag: str, prevalence: str | None, report: dict[str, Any], *,
                   log: Path) -> None:
    """The site's timed steps (import, adapt, predict), then the released model scored as is."""
    py = sys.executable
    steps = {
        "import support": [py, "-m", "client.import_images", str(site / "support"), str(site / "support_imported"),
                           "--dataset", flag],
        "import rest": [py, "-m", "client.import_images", str(site / "rest"), str(site / "rest_imported"),
                        "--dataset", flag],
        "adapt": [py, "-m", "client.adapt", str(model), str(site / "support_imported"), "--out",
                  str(site / "adapted.safetensors"),
                  *(["--prevalence", prevalence] if prevalence else [])],
        "predict": [py, "-m", "client.predict", str(site / "adapted.safetensors"), str(site / "rest_imported"),
                    "--out", str(site / "predictions.csv")],
    }
    timings = {}
    for name, cmd in steps.items():
        timings[name] = round(run(cmd, log=log), 2)
    report["commands"] = {k: shlex.join(v) for k, v in steps.items()}
    report["seconds"] = {**timings, "total": round(sum(timings.values()), 2)}
    report["load_average_after"] = list(os.getloadavg())
    run([py, "-m", "client.predict", str(model), str(site / "rest_imported"), "--out",
         str(site / "before_adaptation.csv")], log=log)


def _score_against_targets(report: dict[str, Any],
                           site: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, bool]]:
    """The metrics after adaptation and of the model as is, into `report`; which targets were met."""
    after = json.loads((site / "predictions.metrics.json").read_text())
    before = json.loads((site / "before_adaptation.metrics.json").read_text())
    keys = ("n", "auc", "accuracy", "sensitivity", "specificity", "ece", "threshold")
    report["after_adaptation"] = {k: after.get(k) for k in (*keys, "confusion_matrix")}
    report["after_adaptation"]["decision_rule"] = after["decision_rule"]
    report["released_model_as_is"] = {k: before.get(k) for k in keys}
    met = {"auc": after["auc"] >= TARGETS["auc"], "accuracy": after["accuracy"] >= TARGETS["accuracy"],
           "seconds": report["seconds"]["total"] <= TARGETS["seconds"]}
    report["targets_met"] = met
    return after, before, met


def _print_results(flag: str, report: dict[str, Any], after: dict[str, Any], before: dict[str, Any],
                   met: dict[str, bool], work: Path) -> None:
    s = report["seconds"]
    print(f"{flag}: {sum(report['export']['support'].values())} support cases "
          f"({report['export']['support']}), {after['n']} predicted")
    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    print(f"after adaptation: AUC {f(after['auc'])}  accuracy {f(after['accuracy'])}  sensitivity "
          f"{f(after.get('sensitivity'))}  specificity {f(after.get('specificity'))}  ECE {f(after['ece'])}  "
          f"(threshold {f(after['threshold'])}, rule {after['decision_rule']['rule']})")
    print(f"released model as is: AUC {f(before['auc'])}  accuracy {f(before['accuracy'])}")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in s.items()))
    print("targets: " + ", ".join(f"{k} {'met' if ok else 'MISSED'}" for k, ok in met.items()))
    print(f"report -> {work / 'new_hospital.json'}")


if __name__ == "__main__":
    sys.exit(main())
