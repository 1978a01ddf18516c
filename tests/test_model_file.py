"""The model file (`common.model_file`): one safetensors file carrying its card, checked on loading;
`python -m client.model_info`; and the server writing it at the end of a run."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

import common.model_file as MF
from client import model_info
from common.config import load_config
from common.medmnist import dataset_info
from common.model import build_model, get_params
from common.model_file import (
    MODEL_FILE, ModelFileError, append_history, load_model_file, save_model_file, training_card, weights_sha256,
)
from conftest import base_run_config

HOSPITALS = {"0": {"epsilon": 7.912, "delta": 1e-5, "rounds_participated": 4, "rounds_declined": 1},
             "1": {"epsilon": 6.5, "delta": 1e-5, "rounds_participated": 3, "rounds_declined": 0}}
ADAPTATION = {"method": "clipped-sgd", "lr": 0.1, "steps": 5, "chosen_on": "validation hospitals",
              "validation_hospitals": [3]}


def make_card(**over) -> dict:
    cfg = load_config({**base_run_config(), **over})
    return training_card(cfg, hospitals=HOSPITALS, adaptation=ADAPTATION, rounds=cfg.num_server_rounds,
                         training_hospitals=[0, 1], held_out_hospitals=[2, 3], created=1.7e9)


def make_params(flag: str = "breastmnist", seed: int = 0) -> dict[str, torch.Tensor]:
    info = dataset_info(flag)
    return get_params(build_model(in_channels=info.n_channels, num_classes=info.n_classes, seed=seed))


@pytest.fixture
def saved(tmp_path) -> tuple[Path, dict, dict]:
    path, params, card = tmp_path / MODEL_FILE, make_params(), make_card()
    save_model_file(path, params, card)
    return path, params, card


def header_of(blob: bytes) -> tuple[int, dict]:
    n = struct.unpack("<Q", blob[:8])[0]
    return n, json.loads(blob[8:8 + n])


def with_header(blob: bytes, header: dict) -> bytes:
    n = struct.unpack("<Q", blob[:8])[0]
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + blob[8 + n:]


# --------------------------------------------------------------------------- round trip


def test_round_trip_keeps_weights_and_card(saved) -> None:
    path, params, card = saved
    mf = load_model_file(path, dataset="BreastMNIST")
    assert mf.params.keys() == params.keys()
    for k, v in params.items():
        assert mf.params[k].dtype == torch.float32 and torch.equal(mf.params[k], v), k
    got = dict(mf.card)
    weights = got.pop("weights")
    assert got["history"][0].pop("weights_sha256") == weights["sha256"] == weights_sha256(params)
    assert got == card  # everything else exactly as given; the caller's card was not changed
    assert "weights" not in card and "weights_sha256" not in card["history"][0]
    assert weights["parameters"] == sum(v.numel() for v in params.values())


def test_card_describes_the_model(saved) -> None:
    import medmnist  # noqa: F401 - the package's own INFO, as the card must spell it

    mf = load_model_file(saved[0])
    card = mf.card
    assert card["architecture"] == {"class": "SmallCNN", "in_channels": 1, "num_classes": 2, "width": 32,
                                    "groups": 8, "activation": "tanh"}
    assert card["dataset"]["labels"] == {str(k): v for k, v in medmnist.INFO["breastmnist"]["label"].items()}
    assert mf.info == dataset_info("breastmnist", 28)
    assert card["input"]["mean"] == card["input"]["std"] == 0.5 and card["input"]["scale"] == 255
    assert card["input"]["range"] == [-1.0, 1.0] and card["input"]["channel_order"] == "grayscale"
    assert mf.adaptation == {**ADAPTATION, "shots_per_class": 5}
    assert mf.threshold is None  # no site has chosen its own yet
    assert mf.decision_rule["rule"] == "argmax of softmax" and mf.decision_rule["probability_threshold"] == 0.5
    priv = card["privacy"]
    assert priv["dp"] is True and priv["unit"] == "one patient record at one hospital"
    assert priv["accountant"]["name"] == "Opacus RDP" and priv["accountant"]["orders"][-1] == 256.0
    assert priv["hospitals"]["0"] == HOSPITALS["0"] and priv["max_epsilon"] == 7.912
    assert (priv["target_epsilon"], priv["target_delta"]) == (8.0, 1e-5)
    assert card["training"]["config"]["algorithm"] == card["training"]["algorithm"] == "fedavg"
    assert card["code"]["package"] == "fedmeta-med" and card["created"] == "2023-11-14T22:13:20Z"
    assert [h["step"] for h in card["history"]] == ["federated training"]


def test_without_dp_the_card_claims_no_epsilon() -> None:
    priv = make_card(dp=False)["privacy"]
    assert priv["dp"] is False and priv["max_epsilon"] is None and priv["accountant"] is None
    assert priv["hospitals"]["0"]["epsilon"] is None and priv["hospitals"]["0"]["rounds_participated"] == 4
    assert priv["guarantee"].startswith("NONE")


def test_the_loaded_model_computes_what_the_saved_one_did(saved) -> None:
    path, params, _ = saved
    reference = build_model(in_channels=1, num_classes=2, seed=0).eval()
    x = torch.randn(7, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    rng = torch.random.get_rng_state()
    model = load_model_file(path).build_model()
    assert torch.equal(torch.random.get_rng_state(), rng)  # building it drew no random numbers
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert all(p.device.type == "cpu" and p.requires_grad for p in model.parameters()) and not model.training


def test_a_later_step_appends_to_the_history_and_gets_its_own_hash(saved, tmp_path) -> None:
    path, params, _ = saved
    first = load_model_file(path)
    adapted = {k: v + 0.01 for k, v in first.params.items()}
    card = append_history(first.card, "site adaptation", site="hospital 9", method="sgd", steps=5)
    save_model_file(tmp_path / "adapted.safetensors", adapted, card)
    second = load_model_file(tmp_path / "adapted.safetensors")
    steps = second.card["history"]
    assert [s["step"] for s in steps] == ["federated training", "site adaptation"]
    assert steps[0]["weights_sha256"] == first.card["weights"]["sha256"]
    assert steps[1]["weights_sha256"] == second.card["weights"]["sha256"] == weights_sha256(adapted)


def test_the_card_must_fit_the_weights_when_saving(tmp_path) -> None:
    with pytest.raises(ModelFileError, match="shape"):
        save_model_file(tmp_path / "m.safetensors", make_params("bloodmnist"), make_card())
    bad = make_params()
    bad["classifier.bias"] = torch.tensor([0.0, float("nan")])
    with pytest.raises(ModelFileError, match="NaN"):
        save_model_file(tmp_path / "m.safetensors", bad, make_card())
    assert not (tmp_path / "m.safetensors").exists()


# --------------------------------------------------------------------------- refused files


def test_one_flipped_weight_byte_fails_the_hash(saved) -> None:
    path = saved[0]
    blob = bytearray(path.read_bytes())
    n, header = header_of(bytes(blob))
    start = header["classifier.weight"]["data_offsets"][0]
    blob[8 + n + start] ^= 0x01  # the lowest mantissa bit of one weight: still a finite float
    path.write_bytes(bytes(blob))
    with pytest.raises(ModelFileError, match="SHA-256.*damaged or changed"):
        load_model_file(path)


@pytest.mark.parametrize("keep", [0, 5, 8, 100, "half", -1])
def test_a_truncated_file_is_refused(saved, keep) -> None:
    path = saved[0]
    blob = path.read_bytes()
    cut = {"half": len(blob) // 2, -1: len(blob) - 1}.get(keep, keep)
    path.write_bytes(blob[:cut])
    with pytest.raises(ModelFileError, match="truncated|corrupt"):
        load_model_file(path)


def test_random_bytes_are_refused(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for i, size in enumerate((3, 64, 4096, 300_000)):
        path = tmp_path / f"r{i}.safetensors"
        path.write_bytes(rng.bytes(size))
        with pytest.raises(ModelFileError, match="not a safetensors|truncated|corrupt"):
            load_model_file(path)


class _Payload:
    """Unpickling this creates a folder: the proof that loading ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_pickle_renamed_safetensors_is_refused_without_running_it(tmp_path, writer) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / MODEL_FILE
    payload = {"classifier.weight": torch.zeros(2, 64), "x": _Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(ModelFileError, match="pickle") as err:
        load_model_file(path)
    assert "model.pt" in str(err.value)
    assert not marker.exists()


def test_a_model_for_another_dataset_is_refused(saved) -> None:
    with pytest.raises(ModelFileError, match="model for breastmnist .*not for pneumoniamnist") as err:
        load_model_file(saved[0], dataset="pneumoniamnist")
    assert "malignant" in str(err.value) and "Use a model trained on pneumoniamnist" in str(err.value)


@pytest.mark.parametrize("lie", ["shape", "offsets", "dtype", "length"])
def test_a_header_that_lies_about_sizes_is_refused(saved, lie) -> None:
    path = saved[0]
    blob = path.read_bytes()
    n, header = header_of(blob)
    if lie == "length":  # an absurd header length: refused before safetensors allocates anything
        path.write_bytes(struct.pack("<Q", 1 << 60) + blob[8:])
        match = "header"
    else:
        entry = header["features.0.weight"]
        if lie == "shape":
            entry["shape"] = [64, 1, 3, 3]  # twice the bytes its offsets hold
        elif lie == "offsets":
            entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][1] + 10**9]
        else:
            entry["dtype"] = "F64"
        path.write_bytes(with_header(blob, header))
        match = "corrupt"
    with pytest.raises(ModelFileError, match=match):
        load_model_file(path)


def test_tensors_that_do_not_fit_the_cards_architecture_are_refused(tmp_path) -> None:
    params, card = make_params(), make_card()
    card["architecture"]["width"] = 16
    card["weights"] = {"sha256": weights_sha256(params)}
    path = tmp_path / MODEL_FILE
    path.write_bytes(st_save(params, metadata={MF.METADATA_KEY: json.dumps(card)}))
    with pytest.raises(ModelFileError, match="shape .* the card's architecture needs"):
        load_model_file(path)
    del params["classifier.bias"]
    card["architecture"]["width"] = 32
    card["weights"] = {"sha256": weights_sha256(params)}
    path.write_bytes(st_save(params, metadata={MF.METADATA_KEY: json.dumps(card)}))
    with pytest.raises(ModelFileError, match="missing classifier.bias"):
        load_model_file(path)


def test_non_finite_weights_are_refused_even_with_a_matching_hash(tmp_path) -> None:
    params, card = make_params(), make_card()
    params["features.0.bias"][3] = float("inf")
    card["weights"] = {"sha256": weights_sha256(params)}
    path = tmp_path / MODEL_FILE
    path.write_bytes(st_save(params, metadata={MF.METADATA_KEY: json.dumps(card)}))
    with pytest.raises(ModelFileError, match="features.0.bias hold NaN or Inf"):
        load_model_file(path)


@pytest.mark.parametrize(("metadata", "match"), [
    (None, "without 'fedmeta' metadata"),
    ({"fedmeta": "{not json"}, "not valid JSON"),
    ({"fedmeta": json.dumps({"format": "something else"})}, "is not a 'fedmeta-med model' card"),
    ({"fedmeta": json.dumps({"format": "fedmeta-med model", "format_version": 99})}, "format version 99"),
])
def test_a_safetensors_file_that_is_not_ours_is_refused(tmp_path, metadata, match) -> None:
    path = tmp_path / MODEL_FILE
    path.write_bytes(st_save(make_params(), metadata=metadata))
    with pytest.raises(ModelFileError, match=match):
        load_model_file(path)


def test_missing_file_and_size_guard(tmp_path, saved, monkeypatch) -> None:
    with pytest.raises(ModelFileError, match="no such file"):
        load_model_file(tmp_path / "absent.safetensors")
    monkeypatch.setattr(MF, "MAX_FILE_BYTES", 1000)
    with pytest.raises(ModelFileError, match="more than the 1000"):
        load_model_file(saved[0])


# --------------------------------------------------------------------------- python -m client.model_info


def test_model_info_prints_what_a_reader_needs(saved, capsys) -> None:
    assert model_info.main([str(saved[0])]) == 0
    out = capsys.readouterr().out
    for text in ("breastmnist", "0: malignant", "1: normal, benign", "1x28x28 grayscale", "(pixel / 255 - 0.5) / 0.5",
                 "fedavg", "one patient record at one hospital", "Opacus RDP", "ε", "δ", "7.912", "6.500",
                 "max ε = 7.912 at δ = 1e-05", "clipped-sgd, lr 0.1, 5 steps", "argmax of softmax",
                 "federated training", "(verified)", "fedmeta-med"):
        assert text in out, text
    assert "NO DIFFERENTIAL PRIVACY" not in out
    assert model_info.main([str(saved[0]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == load_model_file(saved[0]).card


def test_model_info_says_loudly_when_there_was_no_dp(tmp_path, capsys) -> None:
    path = tmp_path / MODEL_FILE
    save_model_file(path, make_params(), make_card(dp=False))
    assert model_info.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "NO DIFFERENTIAL PRIVACY" in out and "ε" not in out.split("PRIVACY", 1)[1].split("FOR A NEW SITE")[0]


def test_model_info_exits_2_with_one_paragraph_on_a_bad_file(tmp_path, capsys) -> None:
    path = tmp_path / MODEL_FILE
    path.write_bytes(b"\x00" * 5)
    assert model_info.main([str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: model file") and captured.err.count("\n") == 1
    assert model_info.main([str(tmp_path / "absent.safetensors")]) == 2


# --------------------------------------------------------------------------- the server writes it


def test_the_server_writes_the_released_theta_with_its_card(medmnist_dir, tmp_path, monkeypatch, capsys) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    import server.app as server_app
    from fake_grid import InProcessGrid

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    made = []

    class Recording(server_app.MetaGradientStrategy):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(server_app, "MetaGradientStrategy", Recording)
    rc = {**base_run_config(), "data-dir": str(medmnist_dir), "results-dir": str(tmp_path / "results"),
          "dataset": "breastmnist", "num-hospitals": 4, "num-held-out": 1, "clients-per-round": 3, "min-replies": 2,
          "num-server-rounds": 2, "eval-every": 2, "wait-for-nodes": 0.0, "round-timeout": 30.0,
          "local-meta-steps": 2, "tune-adaptation": False, "theta-average": 0.5}
    cfg = load_config(rc)
    grid = InProcessGrid(rc, {100 + h: {"partition-id": h, "num-partitions": cfg.num_hospitals}
                              for h in range(cfg.num_hospitals)})
    summary = server_app.run_federation(grid, cfg)
    results = tmp_path / "results"
    assert not (results / "model.pt").exists()
    mf = load_model_file(results / MODEL_FILE, dataset="breastmnist")
    released = made[0].optimizer.released()
    assert mf.params.keys() == released.keys()
    for k, v in released.items():
        assert torch.equal(mf.params[k], v.float()), k
    card = mf.card
    assert card["privacy"]["hospitals"] == summary["hospitals"] and card["privacy"]["dp"] is True
    assert card["privacy"]["max_epsilon"] == pytest.approx(summary["max_epsilon"])
    assert mf.adaptation == {**summary["final"]["adaptation"], "shots_per_class": cfg.shots}
    assert card["training"]["training_hospitals"] == summary["training_hospitals"]
    assert card["training"]["config"] == summary["config"] and card["training"]["rounds_completed"] == 2
    assert card["evaluation"]["auc"] == pytest.approx(summary["final"]["auc"])
    assert card["history"][0]["weights_sha256"] == card["weights"]["sha256"]
    assert model_info.main([str(results / MODEL_FILE)]) == 0
    out = capsys.readouterr().out
    eps0 = summary["hospitals"][str(summary["training_hospitals"][0])]["epsilon"]
    assert f"{eps0:.3f}" in out and "malignant" in out


def test_the_card_is_written_without_git(monkeypatch) -> None:
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(MF.subprocess, "run", no_git)
    code = make_card()["code"]
    assert code["git_commit"] is None and code["package"] == "fedmeta-med"
