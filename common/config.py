"""Run configuration: one source (`[tool.flwr.app.config]`), one validated, frozen view of it.

Every key is kebab-case in the run config and snake_case here. `load_config` is the only way in:
it checks every value and raises `ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

from common.algorithms import Algorithm


class Choice(str, Enum):
    """A fixed-choice run-config value. A `str` (it compares, hashes, prints and JSON-encodes as its
    value), parsed once by `load_config`; code downstream compares members, never literals."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class MetaOptimizer(Choice):
    ADAM = "adam"
    SGD = "sgd"


class AdaptMethod(Choice):
    """How a new hospital fine-tunes (`common.adaptation`)."""

    SGD = "sgd"
    CLIPPED_SGD = "clipped-sgd"
    ADAM = "adam"
    NORM_ADAM = "norm-adam"


class InnerParams(Choice):
    ALL = "all"
    HEAD = "head"


class Activation(Choice):
    RELU = "relu"
    TANH = "tanh"


class AcquisitionShift(Choice):
    NONE = "none"
    MEDMNISTC = "medmnistc"


class AcquisitionHeldOut(Choice):
    UNSEEN = "unseen"
    SAME = "same"
    NONE = "none"


META_OPTIMIZERS = MetaOptimizer.values()
ADAPT_METHODS = AdaptMethod.values()
INNER_PARAMS = InnerParams.values()
ACTIVATIONS = Activation.values()  # common.model.ACTIVATIONS (config stays free of torch)
ACQUISITION_SHIFTS = AcquisitionShift.values()  # common.acquisition: each hospital's scanner
ACQUISITION_HELD_OUT = AcquisitionHeldOut.values()  # held-out hospitals' scanners vs the training ones


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class Config:
    """The validated run configuration shared by the ServerApp, every ClientApp and the scripts."""

    dataset: str
    data_dir: str
    image_size: int
    download: bool
    num_hospitals: int
    num_held_out: int
    held_out_fold: int
    dirichlet_alpha: float
    size_alpha: float
    acquisition_shift: AcquisitionShift
    acquisition_severity_max: int
    acquisition_held_out: AcquisitionHeldOut
    activation: Activation
    num_server_rounds: int
    clients_per_round: int
    min_replies: int
    round_timeout: float
    wait_for_nodes: float
    algorithm: Algorithm
    inner_steps: int
    inner_lr: float
    inner_params: InnerParams
    local_meta_steps: int
    local_lr: float
    meta_lr: float
    meta_optimizer: MetaOptimizer
    server_momentum: float
    theta_average: float
    batch_size: int
    dp: bool
    noise_multiplier: float
    target_epsilon: float
    target_delta: float
    max_grad_norm: float
    loss_clip: float
    loss_noise_factor: float
    noise_lr_reference: float
    shots: int
    adapt_steps: int
    adapt_lr: float
    adapt_method: AdaptMethod
    tune_adaptation: bool
    eval_every: int
    seed: int
    results_dir: str
    max_update_norm: float
    checkpoint_dir: str
    resume: bool

    @property
    def first_order(self) -> bool:
        """True for every algorithm except second-order MAML."""
        return not self.algorithm.second_order

    @property
    def checkpoint_folder(self) -> str:
        """Where the server's checkpoint goes: `checkpoint-dir`, or `<results-dir>/checkpoint` when empty."""
        return self.checkpoint_dir or f"{self.results_dir.rstrip('/')}/checkpoint"

    @property
    def held_out_ids(self) -> tuple[int, ...]:
        """The hospitals held out of training (`common.partition.held_out_hospitals`, fold `held-out-fold`)."""
        from common.partition import held_out_hospitals  # noqa: PLC0415 (config stays free of numpy at import)

        return held_out_hospitals(self.num_hospitals, self.num_held_out, self.seed, fold=self.held_out_fold)

    @property
    def num_training_hospitals(self) -> int:
        return self.num_hospitals - self.num_held_out

    @property
    def gradients_per_episode(self) -> int:
        """Gradients computed from records in one local episode: the inner steps, plus the query
        gradient for (FO)MAML; FedAvg's episode is one plain local step."""
        return self.algorithm.gradients_per_episode(self.inner_steps)

    @property
    def gradient_steps_per_round(self) -> int:
        """Gradients computed from records per round (each one DP step when DP is on)."""
        return self.local_meta_steps * self.gradients_per_episode

    @property
    def planned_rounds_per_hospital(self) -> int:
        """Rounds a training hospital expects to join: ``num-server-rounds`` x its sampling chance.

        The noise is calibrated for this participation (so the budget is spent, not left over); a
        hospital sampled more often than expected declines the rounds its ledger cannot afford.
        """
        share = min(self.clients_per_round, self.num_training_hospitals) / self.num_training_hospitals
        return max(1, math.ceil(self.num_server_rounds * share - 1e-9))

    def to_run_config(self) -> dict[str, Any]:
        """Back to kebab-case keys (for summaries and checkpoints); choices as plain strings."""
        def plain(v: Any) -> Any:
            return v.value if isinstance(v, Enum) else v

        return {f.name.replace("_", "-"): plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _key(name: str) -> str:
    return name.replace("_", "-")


def _get(rc: Mapping[str, Any], name: str) -> Any:
    key = _key(name)
    if key not in rc:
        raise ConfigError(
            f"run-config key '{key}' is missing; add it to [tool.flwr.app.config] in pyproject.toml "
            f"or pass it with --run-config \"{key}=...\""
        )
    return rc[key]


def _invalid(name: str, shown: Any, requirement: str) -> ConfigError:
    """The error for one bad value: the key, the value as `shown` and what is allowed."""
    return ConfigError(f"run-config key '{_key(name)}' = {shown}: {requirement}")


def _int(rc: Mapping[str, Any], name: str, *, lo: int, hi: int | None = None) -> int:
    value = _get(rc, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise _invalid(name, repr(value), "must be an integer")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise _invalid(name, value, f"must be {allowed}")
    return value


def _float(
    rc: Mapping[str, Any], name: str, *, lo: float, hi: float | None = None, lo_open: bool = True
) -> float:
    value = _get(rc, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(name, repr(value), "must be a number")
    value = float(value)
    too_low = value <= lo if lo_open else value < lo
    if not math.isfinite(value) or too_low or (hi is not None and value > hi):
        bound = f"> {lo}" if lo_open else f">= {lo}"
        allowed = bound if hi is None else f"{bound} and <= {hi}"
        if not math.isfinite(value):
            allowed += " (and finite)"
        raise _invalid(name, value, f"must be {allowed}")
    return value


def _bool(rc: Mapping[str, Any], name: str) -> bool:
    value = _get(rc, name)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _invalid(name, repr(value), "must be true or false")


E = TypeVar("E", bound=Enum)


def _choice(rc: Mapping[str, Any], name: str, choices: type[E]) -> E:
    value = _get(rc, name)
    allowed = tuple(m.value for m in choices)
    if not isinstance(value, str) or value.lower() not in allowed:
        raise _invalid(name, repr(value), f"must be one of {', '.join(allowed)}")
    return choices(value.lower())


def _str(rc: Mapping[str, Any], name: str) -> str:
    value = _get(rc, name)
    if not isinstance(value, str) or not value.strip():
        raise _invalid(name, repr(value), "must be a non-empty string")
    return value


def _optional_str(rc: Mapping[str, Any], name: str) -> str:
    value = _get(rc, name)
    if not isinstance(value, str):
        raise _invalid(name, repr(value), "must be a string (\"\" for the default)")
    return value.strip()


def load_config(run_config: Mapping[str, Any]) -> Config:
    """Validate a Flower run config (kebab-case keys) into a `Config`.

    Raises `ConfigError` for the first problem found. Dataset-dependent checks (is the flag a
    MedMNIST 2D set, is the file there) happen when the data is loaded, in `common.medmnist`.
    """
    rc = dict(run_config)
    _refuse_unknown_keys(rc)
    cfg = _read_values(rc)
    _check_together(cfg)
    return cfg


def _refuse_unknown_keys(rc: Mapping[str, Any]) -> None:
    known = {_key(f.name) for f in dataclasses.fields(Config)}
    unknown = sorted(set(rc) - known)
    if unknown:
        raise ConfigError(
            f"unknown run-config key(s) {', '.join(repr(k) for k in unknown)}; "
            f"known keys: {', '.join(sorted(known))}"
        )


def _read_values(rc: Mapping[str, Any]) -> Config:
    """Each key read and checked alone (type and range)."""
    return Config(
        dataset=_str(rc, "dataset").lower(),
        data_dir=_str(rc, "data_dir"),
        image_size=_int(rc, "image_size", lo=28),
        download=_bool(rc, "download"),
        num_hospitals=_int(rc, "num_hospitals", lo=2),
        num_held_out=_int(rc, "num_held_out", lo=0),
        held_out_fold=_int(rc, "held_out_fold", lo=0),
        dirichlet_alpha=_float(rc, "dirichlet_alpha", lo=0.0),
        size_alpha=_float(rc, "size_alpha", lo=0.0),
        acquisition_shift=_choice(rc, "acquisition_shift", AcquisitionShift),
        acquisition_severity_max=_int(rc, "acquisition_severity_max", lo=1, hi=5),
        acquisition_held_out=_choice(rc, "acquisition_held_out", AcquisitionHeldOut),
        activation=_choice(rc, "activation", Activation),
        num_server_rounds=_int(rc, "num_server_rounds", lo=1),
        clients_per_round=_int(rc, "clients_per_round", lo=1),
        min_replies=_int(rc, "min_replies", lo=1),
        round_timeout=_float(rc, "round_timeout", lo=0.0),
        wait_for_nodes=_float(rc, "wait_for_nodes", lo=0.0, lo_open=False),
        algorithm=_choice(rc, "algorithm", Algorithm),
        inner_steps=_int(rc, "inner_steps", lo=1),
        inner_lr=_float(rc, "inner_lr", lo=0.0),
        inner_params=_choice(rc, "inner_params", InnerParams),
        local_meta_steps=_int(rc, "local_meta_steps", lo=1),
        local_lr=_float(rc, "local_lr", lo=0.0),
        meta_lr=_float(rc, "meta_lr", lo=0.0),
        meta_optimizer=_choice(rc, "meta_optimizer", MetaOptimizer),
        server_momentum=_float(rc, "server_momentum", lo=0.0, hi=0.999, lo_open=False),
        theta_average=_float(rc, "theta_average", lo=0.0, hi=0.99, lo_open=False),
        batch_size=_int(rc, "batch_size", lo=1),
        dp=_bool(rc, "dp"),
        noise_multiplier=_float(rc, "noise_multiplier", lo=0.0, lo_open=False),
        target_epsilon=_float(rc, "target_epsilon", lo=0.0),
        target_delta=_float(rc, "target_delta", lo=0.0, hi=0.1),
        max_grad_norm=_float(rc, "max_grad_norm", lo=0.0),
        loss_clip=_float(rc, "loss_clip", lo=0.0),
        loss_noise_factor=_float(rc, "loss_noise_factor", lo=0.0),
        noise_lr_reference=_float(rc, "noise_lr_reference", lo=0.0, lo_open=False),
        shots=_int(rc, "shots", lo=1),
        adapt_steps=_int(rc, "adapt_steps", lo=0),
        adapt_lr=_float(rc, "adapt_lr", lo=0.0),
        adapt_method=_choice(rc, "adapt_method", AdaptMethod),
        tune_adaptation=_bool(rc, "tune_adaptation"),
        eval_every=_int(rc, "eval_every", lo=1),
        seed=_int(rc, "seed", lo=0),
        results_dir=_str(rc, "results_dir"),
        max_update_norm=_float(rc, "max_update_norm", lo=0.0),
        checkpoint_dir=_optional_str(rc, "checkpoint_dir"),
        resume=_bool(rc, "resume"),
    )


def _check_together(cfg: Config) -> None:
    """The checks that involve more than one key."""
    if cfg.image_size not in (28, 64, 128, 224):
        raise ConfigError(f"run-config key 'image-size' = {cfg.image_size}: must be one of 28, 64, 128, 224")
    if cfg.num_held_out >= cfg.num_hospitals:
        raise ConfigError(
            f"run-config key 'num-held-out' = {cfg.num_held_out}: must be smaller than "
            f"'num-hospitals' = {cfg.num_hospitals} (at least one hospital has to train)"
        )
    if cfg.num_held_out and (cfg.held_out_fold + 1) * cfg.num_held_out > cfg.num_hospitals:
        raise ConfigError(
            f"run-config key 'held-out-fold' = {cfg.held_out_fold}: with {cfg.num_hospitals} hospitals and "
            f"{cfg.num_held_out} held out there are {cfg.num_hospitals // cfg.num_held_out} folds (0.."
            f"{cfg.num_hospitals // cfg.num_held_out - 1})"
        )
    if cfg.min_replies > cfg.clients_per_round:
        raise ConfigError(
            f"run-config key 'min-replies' = {cfg.min_replies}: must be <= 'clients-per-round' = "
            f"{cfg.clients_per_round}"
        )
    if cfg.inner_params is InnerParams.HEAD and not cfg.algorithm.has_query:
        raise ConfigError(
            f"run-config key 'inner-params' = 'head' needs algorithm 'fomaml' or 'maml': {cfg.algorithm}'s "
            "update is the inner loop's own change, so with a head-only inner loop the body would never train"
        )
    if cfg.dp and cfg.algorithm.second_order:
        raise ConfigError(
            "run-config key 'algorithm' = 'maml' with 'dp' = true is refused: second-order MAML "
            "differentiates through the inner-loop updates, so per-sample clipping of the inner "
            "gradients does not bound each record's influence on the meta-gradient and no honest "
            "epsilon can be stated. Use algorithm='fomaml' or 'reptile' with DP, or dp=false for 'maml'."
        )
