"""The released model as one self-describing file: `<results-dir>/model.safetensors`.

The weights are stored in the safetensors format (https://huggingface.co/docs/safetensors): an
8-byte little-endian header length, a JSON header naming every tensor's dtype, shape and byte
range, then the raw bytes. Its string->string metadata carries one key, `METADATA_KEY`, holding
the model card: a JSON document saying what the model diagnoses, what input it expects, how it
was trained, the privacy record of that training, how a new site should adapt it, and what was
done to the weights since (`history`).

Why not a pickle (`torch.save`, the old `model.pt`): unpickling runs code chosen by whoever wrote
the file, so a model file passed between hospitals would be a way to execute code on a
hospital's machine. Loading a safetensors file parses JSON and copies bytes; nothing in the file
is ever executed. Before safetensors reads anything, `load_model_file` checks the file size and
the declared header length against fixed bounds, so a hostile file cannot make it allocate
absurdly; the tensors' names, shapes and dtype are checked against the architecture in the card
before any weight is read.

Weights hash (`weights_sha256`): SHA-256 over the tensors in sorted name order; for each, an
8-byte little-endian length and the compact JSON `{"dtype":"float32","name":...,"shape":[...]}`,
then an 8-byte length and the tensor's bytes as little-endian float32. It identifies the weights
independently of the card (editing the card does not change it) and of the file's layout.

This module must not import flwr.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import struct
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.config import Config
from common.medmnist import DataError, DatasetInfo, dataset_info
from common.files import atomic_write, json_safe
from common.model import ACTIVATIONS, SmallCNN
from common.privacy import ACCOUNTANT, RDP_ORDERS

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "MODEL_FILE",
    "ModelFile",
    "ModelFileError",
    "append_history",
    "architecture_of",
    "code_version",
    "load_model_file",
    "save_model_file",
    "training_card",
    "weights_sha256",
]

MODEL_FILE = "model.safetensors"  # the server's file name inside <results-dir>
METADATA_KEY = "fedmeta"
FORMAT = "fedmeta-med model"
FORMAT_VERSION = 1
PACKAGE = "fedmeta-med"

PRIVACY_UNIT = "one patient record at one hospital"
ACCOUNTANT_NAME = "Opacus RDP"
NORMALISATION = {"scale": 255.0, "mean": 0.5, "std": 0.5}

# Bounds checked before safetensors parses anything. The card is a few kB (a long history or a
# thousand hospitals stay far below 4 MiB); SmallCNN at width 32 is about 250 kB of weights.
MAX_HEADER_BYTES = 4 << 20
MAX_FILE_BYTES = 1 << 30
MAX_WIDTH = 1024

_REMEDY = ("Use the model.safetensors a completed run wrote to its results-dir (or copy it again; "
           "`python -m client.model_info FILE` checks a file).")


class ModelFileError(ValueError):
    """A model file is missing, damaged, not ours, or does not fit what the caller asked for."""


def _error(path: str | Path, problem: str, fix: str = _REMEDY) -> ModelFileError:
    return ModelFileError(f"model file {path}: {problem}. {fix}")


# --------------------------------------------------------------------------- the file


@dataclass(frozen=True, eq=False)
class ModelFile:
    """A loaded, verified model file: float32 weights and the parsed card."""

    params: dict[str, torch.Tensor]
    card: dict[str, Any]

    @property
    def info(self) -> DatasetInfo:
        """The dataset's metadata (`common.medmnist.dataset_info`), with the label names the card spells."""
        ds = self.card["dataset"]
        return dataclasses.replace(dataset_info(ds["flag"], ds["image_size"]), labels=dict(ds["labels"]))

    def build_model(self) -> nn.Module:
        """SmallCNN from the card's architecture, holding (copies of) the file's weights, in eval mode.

        No random initialisation runs (the module is built on the meta device), so the global RNG is untouched.
        """
        arch = self.card["architecture"]
        with torch.device("meta"):
            model = SmallCNN(**{k: arch[k] for k in _ARCH_ARGS})
        model.load_state_dict({k: v.clone() for k, v in self.params.items()}, strict=True, assign=True)
        return model.eval()

    @property
    def adaptation(self) -> dict[str, Any]:
        """How a new site should adapt the weights: {"method", "lr", "steps", "chosen_on", ...}."""
        return dict(self.card["adaptation"])

    @property
    def threshold(self) -> dict[str, Any] | None:
        """The site threshold an adapted model records (`common.threshold.OperatingPoint.to_json`);
        None for the trained model, whose rule is the card's `decision_rule` (argmax of softmax, i.e.
        probability 0.5 for label 1 of a binary task)."""
        rule = self.card.get("threshold")
        return None if rule is None else dict(rule)

    @property
    def decision_rule(self) -> dict[str, Any]:
        """The trained model's fixed rule: {"rule": "argmax of softmax", ...}; binary adds "probability_threshold"."""
        return dict(self.card.get("decision_rule") or {"rule": "argmax of softmax"})


def weights_sha256(params: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in sorted name order (see the module docstring)."""
    digest = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().cpu()
        if t.dtype != torch.float32:
            raise ModelFileError(f"weight {name!r} has dtype {t.dtype}; model files hold float32 weights")
        head = json.dumps({"dtype": "float32", "name": name, "shape": list(t.shape)},
                          separators=(",", ":"), sort_keys=True).encode()
        data = t.contiguous().numpy().astype("<f4", copy=False).tobytes()
        for chunk in (head, data):
            digest.update(len(chunk).to_bytes(8, "little"))
            digest.update(chunk)
    return digest.hexdigest()


def save_model_file(path: str | Path, params: Mapping[str, torch.Tensor], card: Mapping[str, Any]) -> None:
    """Write `params` and `card` to `path` atomically (whole file or nothing).

    Sets the card's `weights` entry (SHA-256, parameter count) and, when the last `history` entry has
    no `weights_sha256`, records the hash there too (the weights that step produced). The caller's
    card is not changed. Refuses weights that do not fit the card's architecture or are not finite,
    so every file written here loads.
    """
    card = json_safe(copy.deepcopy(dict(card)))
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in params.items()}
    _check_card(path, card, loading=False)
    _check_layout(path, card, {k: (list(v.shape), "F32") for k, v in weights.items()})
    bad = [k for k, v in weights.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise ModelFileError(f"refusing to write {path}: weights {', '.join(sorted(bad))} hold NaN or Inf values")
    digest = weights_sha256(weights)
    card["weights"] = {"sha256": digest, "dtype": "float32", "tensors": len(weights),
                       "parameters": sum(v.numel() for v in weights.values()),
                       "hash": "SHA-256 over names, dtypes, shapes and bytes in sorted name order"}
    history = card.get("history")
    if isinstance(history, list) and history and isinstance(history[-1], dict):
        history[-1].setdefault("weights_sha256", digest)
    from safetensors.torch import save  # noqa: PLC0415 - the one place that writes

    blob = save(weights, metadata={METADATA_KEY: json.dumps(card, allow_nan=False)})
    if len(blob) > MAX_FILE_BYTES or struct.unpack("<Q", blob[:8])[0] > MAX_HEADER_BYTES:
        raise ModelFileError(f"refusing to write {path}: {len(blob)} bytes, beyond what load_model_file accepts")
    with atomic_write(path, file_mode=0o644) as fh:
        fh.write(blob)


def load_model_file(path: str | Path, *, dataset: str | None = None) -> ModelFile:
    """Read and verify a model file; with `dataset`, also check that it is a model for that dataset.

    Raises `ModelFileError` saying what is wrong and what to do: missing, truncated or corrupt file,
    a pickle or another format, no card or an unknown format version, tensors that do not fit the
    card's architecture, a weights hash that does not match, non-finite weights, another dataset.
    """
    path = Path(path).expanduser()
    _check_bytes(path)
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            card = _parse_card(path, meta)
            _check_card(path, card, loading=True)
            if dataset is not None:
                _check_dataset(path, card, dataset)
            layout = {}
            for name in fh.keys():
                piece = fh.get_slice(name)
                layout[name] = (list(piece.get_shape()), str(piece.get_dtype()))
            _check_layout(path, card, layout)
            params = {name: fh.get_tensor(name).clone() for name in layout}
    except ModelFileError:
        raise
    except (SafetensorError, RuntimeError, ValueError, TypeError) as exc:  # safetensors' verdict on the header
        raise _error(path, f"corrupt or truncated safetensors file ({exc})") from exc
    except OSError as exc:
        raise _error(path, f"cannot be read ({exc})", "Check the path and its permissions.") from exc
    expected = card["weights"]["sha256"]
    got = weights_sha256(params)
    if got != expected:
        raise _error(path, f"the weights' SHA-256 is {got[:16]}..., the card says {expected[:16]}...: the "
                           "weights were damaged or changed after the file was written")
    bad = sorted(k for k, v in params.items() if not bool(torch.isfinite(v).all()))
    if bad:
        raise _error(path, f"weights {', '.join(bad)} hold NaN or Inf values (the file is intact but the model is "
                           "unusable; the training it records diverged)",
                     "Retrain (e.g. a lower meta-lr or local-lr) or use an earlier model file.")
    return ModelFile(params=params, card=card)


# --------------------------------------------------------------------------- checks


_ARCH_ARGS = ("in_channels", "num_classes", "width", "groups", "activation")


def _check_bytes(path: Path) -> None:
    """File present, header length plausible: decided from the first 8 bytes, before safetensors runs."""
    if not path.exists():
        raise _error(path, "no such file", "Check the path: a completed run writes <results-dir>/model.safetensors.")
    if not path.is_file():
        raise _error(path, "not a regular file", "Pass the path of a model.safetensors file.")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            first = fh.read(8)
    except OSError as exc:
        raise _error(path, f"cannot be read ({exc})", "Check the path and its permissions.") from exc
    if size < 8:
        raise _error(path, f"truncated: {size} bytes, fewer than the 8-byte safetensors header length")
    if size > MAX_FILE_BYTES:
        raise _error(path, f"{size} bytes, more than the {MAX_FILE_BYTES} a model file of this project can hold; "
                           "it is not one")
    header = struct.unpack("<Q", first)[0]
    if (header > MAX_HEADER_BYTES or 8 + header > size) and (
            first.startswith(b"PK\x03\x04") or (first[:1] == b"\x80" and 2 <= first[1] <= 5)):
        raise _error(path, "it is a Python pickle or a torch.save archive (like the old model.pt), not a "
                           "safetensors model file; it was not opened, because unpickling a file runs code from it",
                     "Use the model.safetensors a run of this version wrote, or re-run the federation.")
    if header > MAX_HEADER_BYTES or header < 2:
        raise _error(path, f"not a safetensors model file (its first 8 bytes declare a {header}-byte header; a model "
                           f"file's is at most {MAX_HEADER_BYTES})")
    if 8 + header > size:
        raise _error(path, f"truncated or not a safetensors file: the header declares {header} bytes but the file has "
                           f"only {size - 8} after the length")


def _parse_card(path: Path, meta: Mapping[str, str]) -> dict[str, Any]:
    raw = meta.get(METADATA_KEY)
    if raw is None:
        raise _error(path, f"a safetensors file without '{METADATA_KEY}' metadata: not a model file of this project "
                           "(no card saying what the model is for, how it was trained and at what privacy cost)",
                     "Use the model.safetensors the federation's server wrote.")
    try:
        card = json.loads(raw)
    except ValueError as exc:
        raise _error(path, f"its '{METADATA_KEY}' metadata is not valid JSON ({exc})") from exc
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise _error(path, f"its '{METADATA_KEY}' metadata is not a '{FORMAT}' card",
                     "Use the model.safetensors the federation's server wrote.")
    version = card.get("format_version")
    if version != FORMAT_VERSION:
        raise _error(path, f"card format version {version!r}; this code reads version {FORMAT_VERSION}",
                     "Read it with the version of fedmeta-med that wrote it (the card's 'code' entry), or upgrade.")
    return card


def _field(path: str | Path, card: Mapping[str, Any], section: str, key: str, kind: type | tuple[type, ...]) -> Any:
    part = card.get(section)
    value = part.get(key) if isinstance(part, Mapping) else None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise _error(path, f"the card lacks or garbles '{section}.{key}' (got {value!r})")
    return value


def _check_card(path: str | Path, card: Mapping[str, Any], *, loading: bool) -> None:
    """The card's architecture, dataset and adaptation are complete and agree with each other; a loaded
    card also carries the weights hash."""
    arch = {k: _field(path, card, "architecture", k, str if k == "activation" else int) for k in _ARCH_ARGS}
    cls = _field(path, card, "architecture", "class", str)
    if cls != "SmallCNN":
        raise _error(path, f"architecture {cls!r}; this code builds SmallCNN only")
    if arch["activation"] not in ACTIVATIONS:
        raise _error(path, f"unknown activation {arch['activation']!r} (known: {', '.join(ACTIVATIONS)})")
    width, groups = arch["width"], arch["groups"]
    if not (1 <= width <= MAX_WIDTH and 1 <= groups and width % groups == 0):
        raise _error(path, f"architecture width={width}, groups={groups}: needs 1 <= width <= {MAX_WIDTH} and "
                           "groups dividing width")
    flag = _field(path, card, "dataset", "flag", str)
    size = _field(path, card, "dataset", "image_size", int)
    labels = _field(path, card, "dataset", "labels", dict)
    try:
        info = dataset_info(flag, size)
    except DataError as exc:
        raise _error(path, f"its dataset is not usable here ({exc})") from exc
    if (arch["in_channels"], arch["num_classes"]) != (info.n_channels, info.n_classes):
        raise _error(path, f"the architecture takes {arch['in_channels']} channels and gives {arch['num_classes']} "
                           f"classes, but {info.flag} has {info.n_channels} and {info.n_classes}")
    if sorted(labels) != sorted(info.labels) or not all(isinstance(v, str) for v in labels.values()):
        raise _error(path, f"its label names {labels!r} do not index the {info.n_classes} classes of {info.flag}")
    for key in ("method", "lr", "steps"):
        _field(path, card, "adaptation", key, (str,) if key == "method" else (int, float))
    _field(path, card, "privacy", "dp", bool)
    if not isinstance(card.get("history"), list) or not all(isinstance(h, dict) for h in card["history"]):
        raise _error(path, f"the card's 'history' is not a list of steps (got {card.get('history')!r})")
    if card.get("threshold") is not None and not isinstance(card["threshold"], dict):
        raise _error(path, f"the card's 'threshold' is not a record (got {card['threshold']!r})")
    if loading:
        digest = _field(path, card, "weights", "sha256", str)
        if len(digest) != 64:
            raise _error(path, f"the card's weights hash {digest!r} is not a SHA-256")


def _check_dataset(path: Path, card: Mapping[str, Any], dataset: str) -> None:
    want = str(dataset).strip().lower()
    ds = card["dataset"]
    if ds["flag"] != want:
        raise _error(path, f"it is a model for {ds['flag']} ({ds.get('task', '?')}: "
                           f"{', '.join(ds['labels'].values())}), not for {want}",
                     f"Use a model trained on {want}, or run with dataset={ds['flag']}.")


def _expected_layout(card: Mapping[str, Any]) -> dict[str, list[int]]:
    arch = card["architecture"]
    with torch.device("meta"):  # shapes only: nothing is allocated, no RNG is drawn
        model = SmallCNN(**{k: arch[k] for k in _ARCH_ARGS})
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _check_layout(path: str | Path, card: Mapping[str, Any], layout: Mapping[str, tuple[list[int], str]]) -> None:
    """Names, shapes and dtype of the stored tensors against the card's architecture."""
    want = _expected_layout(card)
    missing, extra = sorted(set(want) - set(layout)), sorted(set(layout) - set(want))
    if missing or extra:
        raise _error(path, "its tensors do not match the card's architecture ("
                           + "; ".join(p for p in (f"missing {', '.join(missing)}" if missing else "",
                                                   f"unexpected {', '.join(extra)}" if extra else "") if p) + ")")
    for name, shape in want.items():
        got, dtype = layout[name]
        if list(got) != shape:
            raise _error(path, f"tensor {name!r} has shape {list(got)}, the card's architecture needs {shape}")
        if dtype.upper() not in ("F32", "FLOAT32", "TORCH.FLOAT32"):
            raise _error(path, f"tensor {name!r} has dtype {dtype}; model files hold float32 weights")


# --------------------------------------------------------------------------- the card


def architecture_of(model: SmallCNN) -> dict[str, Any]:
    """The constructor arguments that rebuild `model` (read from the module, not assumed)."""
    conv, norm, act = model.features[0], model.features[1], model.features[2]
    activation = next(name for name, cls in ACTIVATIONS.items() if isinstance(act, cls))
    return {"class": type(model).__name__, "in_channels": int(conv.in_channels),
            "num_classes": int(model.classifier.out_features), "width": int(conv.out_channels),
            "groups": int(norm.num_groups), "activation": activation}


def code_version() -> dict[str, Any]:
    """The installed package's version and, when this code sits in a git checkout, its commit."""
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        package_version: str | None = version(PACKAGE)
    except PackageNotFoundError:
        package_version = None
    commit, dirty = None, None
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
        lines = out.stdout.split("\n")
        # only this checkout's own commit, not that of a repository the installed code happens to sit in
        if out.returncode == 0 and len(lines) >= 2 and Path(lines[0]).resolve() == repo and len(lines[1]) == 40:
            commit = lines[1]
            status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10, check=False)
            dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout (e.g. an installed FAB)
        pass
    return {"package": PACKAGE, "version": package_version, "git_commit": commit, "git_dirty": dirty}


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _decision_rule(info: DatasetInfo) -> dict[str, Any]:
    """How the trained model's probabilities become a diagnosis before any site has chosen its own threshold."""
    rule: dict[str, Any] = {"rule": "argmax of softmax", "chosen_on": "fixed rule of the trained model (not tuned)"}
    if info.n_classes == 2:
        rule.update({"score": "softmax probability of label 1", "positive_class": "1",
                     "positive_name": info.labels["1"], "probability_threshold": 0.5,
                     "decision": f"label 1 ({info.labels['1']}) when its probability >= 0.5, else label 0 "
                                 f"({info.labels['0']})"})
    return rule


def training_card(cfg: Config, *, hospitals: Mapping[str, Mapping[str, Any]], adaptation: Mapping[str, Any],
                  rounds: int, training_hospitals: Sequence[int] = (), held_out_hospitals: Sequence[int] = (),
                  evaluation: Mapping[str, Any] | None = None, created: float | None = None) -> dict[str, Any]:
    """The card the server writes with the released model at the end of a run.

    `hospitals`: `summary["hospitals"]` (per training hospital: epsilon, delta, rounds_participated,
    rounds_declined). `adaptation`: `summary["final"]["adaptation"]` (or `server.app._adaptation`).
    `rounds`: rounds completed. `evaluation`: `summary["final"]` (held-out test scores), if any.
    """
    info = dataset_info(cfg.dataset, cfg.image_size)
    with torch.device("meta"):
        arch = architecture_of(SmallCNN(in_channels=info.n_channels, num_classes=info.n_classes,
                                        activation=cfg.activation))
    now = time.time() if created is None else created
    per_hospital = {}
    for hid, rec in sorted(hospitals.items(), key=lambda kv: int(kv[0])):
        entry = {"rounds_participated": int(rec.get("rounds_participated", 0)),
                 "rounds_declined": int(rec.get("rounds_declined", 0))}
        # without DP a hospital reports epsilon 0: that is no guarantee at all, so none is written
        entry.update({"epsilon": float(rec["epsilon"]), "delta": float(rec["delta"])} if cfg.dp
                     else {"epsilon": None, "delta": None})
        per_hospital[str(hid)] = entry
    max_eps = max((h["epsilon"] for h in per_hospital.values()), default=0.0) if cfg.dp else None
    privacy: dict[str, Any] = {
        "dp": cfg.dp, "unit": PRIVACY_UNIT,
        "guarantee": (f"(epsilon, delta)-DP per hospital for {PRIVACY_UNIT}, epsilon as accounted below" if cfg.dp
                      else "NONE: trained without differential privacy"),
        "target_epsilon": cfg.target_epsilon if cfg.dp else None,
        "target_delta": cfg.target_delta if cfg.dp else None,
        "max_epsilon": max_eps,
        "hospitals": per_hospital,
        "mechanism": ("DP-SGD on every gradient a hospital computes from its records: per-record clipping to "
                      "max-grad-norm, Gaussian noise, Poisson sampling" if cfg.dp else None),
        "max_grad_norm": cfg.max_grad_norm if cfg.dp else None,
        "accountant": ({"name": ACCOUNTANT_NAME, "opacus_accountant": ACCOUNTANT,
                        "orders": [float(a) for a in RDP_ORDERS]} if cfg.dp else None),
    }
    chosen = {**dict(adaptation), "shots_per_class": cfg.shots}
    run = {"algorithm": cfg.algorithm.value, "seed": cfg.seed, "num_server_rounds": cfg.num_server_rounds,
           "rounds_completed": int(rounds), "training_hospitals": [int(h) for h in training_hospitals],
           "held_out_hospitals": [int(h) for h in held_out_hospitals], "config": cfg.to_run_config()}
    card: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "created": _iso(now),
        "architecture": arch,
        "dataset": {"flag": info.flag, "task": info.task, "image_size": info.image_size,
                    "n_channels": info.n_channels, "n_classes": info.n_classes, "labels": dict(info.labels)},
        "input": {"layout": "NCHW", "shape": [info.n_channels, info.image_size, info.image_size], "dtype": "float32",
                  "channel_order": "grayscale" if info.n_channels == 1 else "RGB",
                  "pixels": "uint8 0..255, as in the MedMNIST .npz", **NORMALISATION, "range": [-1.0, 1.0],
                  "formula": "x = (pixel / 255 - 0.5) / 0.5 for every channel"},
        "output": {"logits": info.n_classes, "probabilities": "softmax of the logits; index i is label i"},
        "decision_rule": _decision_rule(info),
        "threshold": None,  # a site's own operating point, recorded when it adapts the model
        "adaptation": chosen,
        "privacy": privacy,
        "training": run,
        "evaluation": None if evaluation is None else {
            **{k: v for k, v in evaluation.items() if k != "adaptation"}, "on": "held-out test hospitals"},
        "code": code_version(),
        "history": [{"step": "federated training", "time": _iso(now), "algorithm": cfg.algorithm.value,
                     "rounds": int(rounds), "hospitals": [int(h) for h in training_hospitals], "dp": cfg.dp,
                     "max_epsilon": max_eps, "delta": cfg.target_delta if cfg.dp else None}],
    }
    return json_safe(card)


def append_history(card: Mapping[str, Any], step: str, **details: Any) -> dict[str, Any]:
    """A copy of `card` whose history ends with `{"step": step, "time": now, **details}`.

    Save it with the new weights (`save_model_file`), which records their hash in that entry.
    """
    out = copy.deepcopy(dict(card))
    out.setdefault("history", []).append(json_safe({"step": step, "time": _iso(time.time()), **details}))
    out.pop("weights", None)
    return out

