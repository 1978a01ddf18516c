"""A new site's tools: its operating point (`common.threshold`), its metrics (`common.clinical_metrics`),
`client.adapt` and `client.predict`.

Worked answers for the threshold rules, the metrics against scikit-learn, the adapted weights against
`finetune` on the same records, the CSV as medmnist's INFO spells the labels, exit code 2 on bad
input, and end to end: a short DP training, a held-out hospital's support and query exported as PNG
class folders, adapt + predict give the AUC `adapt_and_score` reports for that hospital.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.adaptation import finetune
from common.clinical_metrics import clinical_metrics, expected_calibration_error
from common.config import load_config
from common.medmnist import MedMNISTData, dataset_info
from common.maml import class_probabilities, evaluate
from common.model import build_model, get_params
from common.threshold import (
    RULE_PREVALENCE, RULE_SUPPORT_BALANCE, RULE_YOUDEN_CV, OperatingPoint, bayes_threshold, choose_threshold,
    stratified_folds, youden_threshold,
)
from conftest import base_run_config

BREAST = dataset_info("breastmnist", 28)
BREAST_NAMES = [BREAST.labels[str(i)] for i in range(2)]  # "malignant", "normal, benign"


# --------------------------------------------------------------------------- helpers


def synthetic_images(n: int, n_classes: int, *, seed: int, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """uint8 MedMNIST-layout images whose class shows as a bright patch (learnable), and labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    rng.shuffle(labels)
    shape = (n, 28, 28) if channels == 1 else (n, 28, 28, channels)
    img = rng.integers(0, 120, size=shape).astype(np.int16)
    for i, c in enumerate(labels):
        r = (int(c) * 7) % 22
        img[i, r:r + 6, r:r + 6] += 110
    return np.clip(img, 0, 255).astype(np.uint8), labels.astype(np.int64)


def export_pngs(folder: Path, images: np.ndarray, labels: np.ndarray | None, names: list[str] | None,
                stems: list[str] | None = None) -> list[str]:
    """PNG files: `folder/<label name>/<stem>.png`, or flat without labels. Returns the relative paths."""
    out = []
    for i, img in enumerate(images):
        stem = stems[i] if stems else f"{i:05d}"
        rel = f"{stem}.png" if labels is None else f"{names[int(labels[i])]}/{stem}.png"
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        out.append(rel)
    return out


def config(data_dir: Path | str, tmp_path: Path, **over):
    rc = {**base_run_config(), "data-dir": str(data_dir), "results-dir": str(tmp_path / "results"),
          "dataset": "breastmnist", "tune-adaptation": False}
    rc.update(over)
    return load_config(rc)


def write_model(path: Path, cfg, params) -> None:
    from common.model_file import save_model_file, training_card

    card = training_card(cfg, hospitals={}, rounds=0,
                         adaptation={"method": cfg.adapt_method, "lr": cfg.adapt_lr, "steps": cfg.adapt_steps,
                                     "chosen_on": "run config"})
    save_model_file(path, params, card)


@pytest.fixture
def model_file(tmp_path):
    """An untrained model whose card says: adapt with 3 steps of SGD at lr 0.05 (cheap for tests)."""
    cfg = config(tmp_path, tmp_path, **{"adapt-method": "sgd", "adapt-lr": 0.05, "adapt-steps": 3})
    path = tmp_path / "model.safetensors"
    write_model(path, cfg, get_params(build_model(in_channels=1, num_classes=2, seed=0, activation=cfg.activation)))
    return path


@pytest.fixture
def support_dir(tmp_path):
    images, labels = synthetic_images(12, 2, seed=1)
    export_pngs(tmp_path / "support", images, labels, BREAST_NAMES)
    return tmp_path / "support"


def tensors(images: np.ndarray, labels: np.ndarray, info=BREAST) -> tuple[torch.Tensor, torch.Tensor]:
    return MedMNISTData(images, labels, info).to_tensor()


# --------------------------------------------------------------------------- the rules, worked


def test_youden_worked_example():
    # 3 negatives, 4 positives. Thresholds in (0.2, 0.3] give sensitivity 1, specificity 2/3 (J 0.667);
    # thresholds in (0.4, 0.6] give 3/4 and 1 (J 0.75), the unique optimum: its midpoint is 0.5.
    labels = np.array([0, 0, 1, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.9])
    t, j, se, sp = youden_threshold(labels == 1, scores)
    assert t == pytest.approx(0.5) and j == pytest.approx(0.75) and se == pytest.approx(0.75) and sp == 1.0
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    assert j == pytest.approx(float(np.max(tpr - fpr)))


def test_youden_tie_takes_the_midpoint_of_the_optimal_range():
    # a positive and a negative share 0.5; with as many of each, cutting below or above it is worth the
    # same (J 0.5 for every threshold in (0.2, 0.8]): the midpoint of that range
    t, j, se, sp = youden_threshold(np.array([0, 1, 0, 1]) == 1, np.array([0.2, 0.5, 0.5, 0.8]))
    assert (t, j, se, sp) == (pytest.approx(0.5), pytest.approx(0.5), 1.0, 0.5)


def test_bayes_threshold_worked_example():
    # balanced support (pi = 0.5), stated prevalence 0.2: odds correction 0.25 -> t = 0.4 / (0.4 + 0.1) = 0.8
    assert bayes_threshold(support_prevalence=0.5, prevalence=0.2) == pytest.approx(0.8)
    assert bayes_threshold(support_prevalence=0.25, prevalence=0.25) == pytest.approx(0.5)
    # at the threshold the corrected posterior is exactly 1/2
    t, pi, p = bayes_threshold(support_prevalence=0.3, prevalence=0.6), 0.3, 0.6
    odds = t / (1 - t) * (p / (1 - p)) / (pi / (1 - pi))
    assert odds == pytest.approx(1.0)


def small_support(n=12, seed=1):
    images, labels = synthetic_images(n, 2, seed=seed)
    x, y = tensors(images, labels)
    model = build_model(in_channels=1, num_classes=2, seed=0)
    return model, get_params(model), x, y


ADAPT = dict(method="sgd", lr=0.05, steps=3, max_grad_norm=1.0)


def test_prevalence_rule_worked_example():
    model, theta, x, y = small_support()  # 6 + 6: pi = 0.5
    p = choose_threshold(model, theta, x, y, task=BREAST.task, label_names=BREAST_NAMES, prevalence=0.2, **ADAPT)
    assert p.rule == RULE_PREVALENCE and p.threshold == pytest.approx(0.8)
    assert p.prevalence == (pytest.approx(0.8), pytest.approx(0.2)) and p.folds == 5  # out-of-fold figures too
    rec = p.to_json()
    assert rec["prevalence"] == {"0": pytest.approx(0.8), "1": pytest.approx(0.2)}
    assert OperatingPoint.from_json(rec, task=BREAST.task, label_names=BREAST_NAMES) == p


def test_youden_rule_is_recorded():
    model, theta, x, y = small_support()
    p = choose_threshold(model, theta, x, y, task=BREAST.task, label_names=BREAST_NAMES, **ADAPT)
    assert p.rule == RULE_YOUDEN_CV and p.folds == 5 and p.support_counts == (6, 6)
    cv = p.to_json()["cross_validation"]
    assert set(cv) >= {"folds", "out_of_fold_auc", "youden_j", "sensitivity", "specificity"}
    assert cv["youden_j"] == pytest.approx(cv["sensitivity"] + cv["specificity"] - 1)


def test_too_few_per_class_falls_back_and_says_so():
    model, theta, x, y = small_support()
    keep = torch.cat([torch.nonzero(y == 0).flatten()[:1], torch.nonzero(y == 1).flatten()])  # 1 + 6
    p = choose_threshold(model, theta, x[keep], y[keep], task=BREAST.task, label_names=BREAST_NAMES, **ADAPT)
    assert p.rule == RULE_SUPPORT_BALANCE and p.threshold == pytest.approx(0.5) and p.folds == 0
    assert "no cross-validation" in p.note
    p = choose_threshold(model, theta, x[keep], y[keep], task=BREAST.task, label_names=BREAST_NAMES,
                         prevalence=0.5, **ADAPT)  # pi = 10/11 corrected to 0.5
    assert p.rule == RULE_PREVALENCE and p.threshold == pytest.approx(bayes_threshold(support_prevalence=6 / 7,
                                                                                      prevalence=0.5))


def test_stratified_folds():
    labels = np.array([0] * 3 + [1] * 12)
    folds = stratified_folds(labels)
    assert len(folds) == 3  # min(5, smallest class)
    assert sorted(np.concatenate(folds).tolist()) == list(range(15))
    assert all((labels[f] == 0).sum() == 1 for f in folds)
    assert stratified_folds(np.array([0, 1, 1, 1])) == []
    # with patient ids, a patient's records stay in one fold (k counts patients: 3 of class 0 here)
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    patients = ["a", "a", "b", "b", "c", "c", "d", "d", "e", "f", "g", "g", "h", "i"]
    folds = stratified_folds(labels, groups=patients)
    assert len(folds) == 3 and sorted(np.concatenate(folds).tolist()) == list(range(14))
    for f in folds:
        inside = {patients[i] for i in f}
        assert not inside & {patients[i] for i in range(14) if i not in set(f.tolist())}
        assert (labels[f] == 0).sum() == 2

def test_cross_validation_never_scores_a_record_it_adapted_on(monkeypatch):
    """Each fold's model is adapted without the records it scores; the threshold uses the support set only."""
    import common.adaptation as A

    model, theta, x, y = small_support()
    x = x.clone()
    x[:, 0, 0, 0] = torch.arange(len(y), dtype=x.dtype)  # a record's id, readable from any batch
    adapted_on: list[set[int]] = []
    real = A.finetune

    def spy(model_, params, xs, ys, **kw):
        adapted_on.append({int(v) for v in xs[:, 0, 0, 0]})
        return real(model_, params, xs, ys, **kw)

    monkeypatch.setattr(A, "finetune", spy)
    scored: list[set[int]] = []
    import common.threshold as TH

    real_logits = TH.predict_logits

    def spy_logits(model_, params, xs):
        scored.append({int(v) for v in xs[:, 0, 0, 0]})
        return real_logits(model_, params, xs)

    monkeypatch.setattr(TH, "predict_logits", spy_logits)
    choose_threshold(model, theta, x, y, task=BREAST.task, label_names=BREAST_NAMES, **ADAPT)
    assert len(adapted_on) == len(scored) == 5
    for train, held in zip(adapted_on, scored):
        assert not train & held and train | held == set(range(len(y)))
    assert set().union(*scored) == set(range(len(y)))


def test_query_labels_do_not_move_the_threshold(model_file, support_dir, tmp_path):
    """The same support set with two different query sets (labels swapped) gives the same threshold."""
    from client.adapt import main as adapt
    from client.predict import main as predict
    from common.model_file import load_model_file

    images, labels = synthetic_images(40, 2, seed=7)
    export_pngs(tmp_path / "query_a", images, labels, BREAST_NAMES)
    export_pngs(tmp_path / "query_b", images, 1 - labels, BREAST_NAMES)
    out = {}
    for q in ("a", "b"):
        adapted = tmp_path / f"adapted_{q}.safetensors"
        assert adapt([str(model_file), str(support_dir), "--out", str(adapted)]) == 0
        assert predict([str(adapted), str(tmp_path / f"query_{q}"), "--out", str(tmp_path / f"pred_{q}.csv")]) == 0
        out[q] = (load_model_file(adapted).threshold,
                  json.loads((tmp_path / f"pred_{q}.metrics.json").read_text()))
    assert out["a"][0] == out["b"][0]
    assert out["a"][1]["auc"] == pytest.approx(1 - out["b"][1]["auc"])  # the query did change


# --------------------------------------------------------------------------- metrics against sklearn


@pytest.mark.parametrize("n_classes", [2, 5])
def test_metrics_against_sklearn(n_classes):
    from sklearn.metrics import accuracy_score, confusion_matrix, recall_score, roc_auc_score

    rng = np.random.default_rng(n_classes)
    labels = rng.integers(0, n_classes, size=300)
    logits = rng.normal(size=(300, n_classes)) + 1.5 * np.eye(n_classes)[labels]
    prob = class_probabilities(torch.as_tensor(logits, dtype=torch.float32))
    names = [f"class {i}" for i in range(n_classes)]
    threshold = 0.37 if n_classes == 2 else None
    m = clinical_metrics(labels, prob, threshold, names)
    pred = (prob[:, 1] >= 0.37).astype(int) if n_classes == 2 else prob.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert m["confusion_matrix"]["matrix"] == confusion_matrix(labels, pred).tolist()
    recall = recall_score(labels, pred, average=None)
    if n_classes == 2:
        assert m["auc"] == pytest.approx(roc_auc_score(labels, prob[:, 1]))
        assert m["sensitivity"] == pytest.approx(recall[1]) and m["specificity"] == pytest.approx(recall[0])
    else:
        assert m["auc"] == pytest.approx(roc_auc_score(labels, prob, multi_class="ovr", average="macro"))
        for k, name in enumerate(names):
            assert m["per_class"][name]["sensitivity"] == pytest.approx(recall[k])
            tn = ((labels != k) & (pred != k)).sum()
            assert m["per_class"][name]["specificity"] == pytest.approx(tn / (labels != k).sum())
    # the same AUC as `common.maml.evaluate` (the federation's held-out scores)
    model = torch.nn.Identity()
    ev = evaluate(model, {}, torch.as_tensor(logits, dtype=torch.float32), torch.as_tensor(labels),
                  num_classes=n_classes)
    assert m["auc"] == ev.auc and m["accuracy_argmax"] == ev.accuracy
    # ECE by hand: 15 equal-width bins of the max probability
    conf, hit = prob.max(1), (prob.argmax(1) == labels)
    ece = sum(abs(hit[b].mean() - conf[b].mean()) * b.sum() / len(labels)
              for lo in np.arange(15) / 15 if (b := (conf > lo) & (conf <= lo + 1 / 15)).any())
    assert m["ece"] == pytest.approx(ece)
    assert expected_calibration_error(labels, prob)[0] == m["ece"]


def test_plot_writes_a_png(tmp_path):
    from common.roc_reliability_plot import plot_roc_reliability

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 80)
    prob = rng.dirichlet([1, 1], 80)
    plot_roc_reliability(tmp_path / "roc.png", labels, prob, label_names=BREAST_NAMES, threshold=0.4)
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- client.adapt, client.predict


def test_adapt_weights_equal_finetune(model_file, support_dir, tmp_path):
    from client.adapt import main as adapt, support_sha256
    from common.image_sets import load_image_set
    from common.model_file import load_model_file

    out = tmp_path / "adapted.safetensors"
    assert adapt([str(model_file), str(support_dir), "--out", str(out)]) == 0
    mf, adapted = load_model_file(model_file), load_model_file(out)
    s = load_image_set(support_dir, mf.info, require_labels=True)
    x, y = tensors(s.images, s.labels)
    phi = finetune(mf.build_model(), mf.params, x, y, method="sgd", steps=3, lr=0.05)  # the card's adaptation
    for k, v in phi.items():
        assert torch.equal(adapted.params[k], v), k
    step = adapted.card["history"][-1]
    assert step["step"] == "site adaptation" and (step["method"], step["lr"], step["steps"]) == ("sgd", 0.05, 3)
    assert step["support"]["counts"] == {BREAST_NAMES[0]: 6, BREAST_NAMES[1]: 6}
    assert step["support"]["sha256"] == support_sha256(s.images, s.labels)
    assert adapted.card["threshold"] == step["threshold"] and adapted.card["threshold"]["rule"] == RULE_YOUDEN_CV
    assert adapted.card["history"][:-1] == mf.card["history"]
    # overrides reach the same call
    out2 = tmp_path / "adapted_clipped.safetensors"
    assert adapt([str(model_file), str(support_dir), "--out", str(out2), "--method", "clipped-sgd", "--lr", "0.3",
                  "--steps", "4", "--max-grad-norm", "0.5"]) == 0
    phi = finetune(mf.build_model(), mf.params, x, y, method="clipped-sgd", steps=4, lr=0.3, max_grad_norm=0.5)
    assert all(torch.equal(load_model_file(out2).params[k], v) for k, v in phi.items())


def test_predict_csv_spells_labels_as_info(model_file, support_dir, tmp_path):
    import medmnist

    from client.predict import main as predict

    images, labels = synthetic_images(30, 2, seed=3)
    rel = export_pngs(tmp_path / "query", images, labels, BREAST_NAMES)
    out = tmp_path / "pred.csv"
    assert predict([str(model_file), str(tmp_path / "query"), "--out", str(out)]) == 0
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    names = [medmnist.INFO["breastmnist"]["label"][str(i)] for i in range(2)]
    assert rows[0] == ["file", "predicted", *names]
    assert sorted(r[0] for r in rows[1:]) == sorted(rel)
    assert all(r[1] in names and abs(float(r[2]) + float(r[3]) - 1) < 1e-6 for r in rows[1:])
    metrics = json.loads((tmp_path / "pred.metrics.json").read_text())
    assert metrics["n"] == 30 and metrics["confusion_matrix"]["labels"] == names
    assert (tmp_path / "pred.png").exists()
    # an unlabelled (flat) folder: predictions only
    export_pngs(tmp_path / "flat", images, None, None)
    assert predict([str(model_file), str(tmp_path / "flat"), "--out", str(tmp_path / "flat.csv")]) == 0
    assert not (tmp_path / "flat.metrics.json").exists()
    with open(tmp_path / "flat.csv", newline="") as fh:
        assert len(list(csv.reader(fh))) == 31


def test_predict_multiclass_names_with_commas(tmp_path):
    """BloodMNIST's label names hold commas and parentheses: the CSV quotes them, columns stay aligned."""
    from client.predict import main as predict

    info = dataset_info("bloodmnist", 28)
    cfg = config(tmp_path, tmp_path, dataset="bloodmnist")
    write_model(tmp_path / "blood.safetensors", cfg,
                get_params(build_model(in_channels=3, num_classes=8, seed=0, activation=cfg.activation)))
    images, labels = synthetic_images(24, 8, seed=4, channels=3)
    names = [info.labels[str(i)] for i in range(8)]
    export_pngs(tmp_path / "blood", images, labels, names)
    assert predict([str(tmp_path / "blood.safetensors"), str(tmp_path / "blood"), "--out",
                    str(tmp_path / "b.csv")]) == 0
    with open(tmp_path / "b.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["file", "predicted", *names] and all(len(r) == 10 for r in rows)
    assert "per_class" in json.loads((tmp_path / "b.metrics.json").read_text())


def _bad_inputs(tmp_path: Path, model_file: Path, support_dir: Path) -> dict[str, list[str]]:
    images, labels = synthetic_images(10, 2, seed=5)
    export_pngs(tmp_path / "one_class", images[labels == 0], labels[labels == 0], BREAST_NAMES)
    export_pngs(tmp_path / "flat", images, None, None)
    bad = tmp_path / "unreadable"
    export_pngs(bad, images, labels, BREAST_NAMES)
    (bad / BREAST_NAMES[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    cfg = config(tmp_path, tmp_path, dataset="bloodmnist")
    write_model(tmp_path / "blood.safetensors", cfg,
                get_params(build_model(in_channels=3, num_classes=8, seed=0, activation=cfg.activation)))
    (tmp_path / "exists.safetensors").write_bytes(b"")
    out = str(tmp_path / "out.safetensors")
    return {
        "missing model": [str(tmp_path / "nope.safetensors"), str(support_dir), "--out", out],
        "garbage model": [str(tmp_path / "garbage.safetensors"), str(support_dir), "--out", out],
        "labels of another dataset": [str(tmp_path / "blood.safetensors"), str(support_dir), "--out", out],
        "one class": [str(model_file), str(tmp_path / "one_class"), "--out", out],
        "no labels": [str(model_file), str(tmp_path / "flat"), "--out", out],
        "unreadable image": [str(model_file), str(bad), "--out", out],
        "output exists": [str(model_file), str(support_dir), "--out", str(tmp_path / "exists.safetensors")],
        "bad prevalence": [str(model_file), str(support_dir), "--out", out, "--prevalence", "1.5"],
        "bad method": [str(model_file), str(support_dir), "--out", out, "--method", "newton"],
    }


def test_adapt_exits_2_on_bad_input(model_file, support_dir, tmp_path, capsys):
    from client.adapt import main as adapt

    for case, argv in _bad_inputs(tmp_path, model_file, support_dir).items():
        assert adapt(argv) == 2, case
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err, case
        assert not (tmp_path / "out.safetensors").exists(), case


def test_predict_exits_2_on_images_that_do_not_fit(model_file, tmp_path, capsys):
    from client.predict import main as predict

    images, labels = synthetic_images(10, 2, seed=6)
    bad = tmp_path / "unreadable"
    export_pngs(bad, images, labels, BREAST_NAMES)
    (bad / BREAST_NAMES[1] / "x.png").write_bytes(b"not an image")
    export_pngs(tmp_path / "wrong_class_names", images, labels, ["benign-ish", "other"])
    for case, folder in (("unreadable", bad), ("unknown class folders", tmp_path / "wrong_class_names"),
                         ("missing", tmp_path / "nope")):
        assert predict([str(model_file), str(folder), "--out", str(tmp_path / "p.csv")]) == 2, case
        assert capsys.readouterr().err.startswith("error: "), case
    assert not (tmp_path / "p.csv").exists()


# --------------------------------------------------------------------------- end to end


def test_end_to_end_adapt_predict_match_adapt_and_score(medmnist_dir, tmp_path):
    """A short DP training; held-out hospital exported as PNGs; adapt + predict give adapt_and_score's AUC."""
    from client.adapt import main as adapt
    from client.predict import main as predict
    from common.held_out import adapt_and_score, adaptation_split
    from common.sites import sites_for
    from simulations.experiments.local_loop import meta_train

    cfg = config(medmnist_dir, tmp_path, **{"num-hospitals": 5, "num-held-out": 1, "clients-per-round": 3,
                                            "num-server-rounds": 2, "local-meta-steps": 2, "dp": True,
                                            "noise-multiplier": 1.0})  # given: calibration costs seconds
    training, held = sites_for(cfg)
    run = meta_train(cfg, training)
    assert run.epsilons and max(run.epsilons.values()) > 0
    model_path = tmp_path / "model.safetensors"
    write_model(model_path, cfg, run.theta)
    site = held[0]
    s_idx, q_idx = adaptation_split(cfg, site)
    pixels = np.rint((site.x.numpy() * 0.5 + 0.5) * 255).astype(np.uint8)[:, 0]  # back to the file's uint8
    assert torch.equal(MedMNISTData(pixels, site.y.numpy(), site.info).to_tensor()[0], site.x)
    names = [site.info.labels[str(i)] for i in range(site.info.n_classes)]
    y = site.y.numpy()
    export_pngs(tmp_path / "support", pixels[s_idx], y[s_idx], names, [f"{i:05d}" for i in s_idx])
    export_pngs(tmp_path / "query", pixels[q_idx], y[q_idx], names, [f"{i:05d}" for i in q_idx])
    adapted = tmp_path / "adapted.safetensors"
    assert adapt([str(model_path), str(tmp_path / "support"), "--out", str(adapted), "--method", cfg.adapt_method,
                  "--lr", str(cfg.adapt_lr), "--steps", str(cfg.adapt_steps)]) == 0
    assert predict([str(adapted), str(tmp_path / "query"), "--out", str(tmp_path / "pred.csv")]) == 0
    metrics = json.loads((tmp_path / "pred.metrics.json").read_text())
    want = adapt_and_score(cfg, site, run.theta)
    assert metrics["n"] == want.num_query
    assert abs(metrics["auc"] - want.auc) <= 1e-6, (metrics["auc"], want.auc)
    assert metrics["accuracy_argmax"] == pytest.approx(want.accuracy, abs=1e-6)
