"""The run's model for a dataset (`new_model`) and the shapes of its parameters (`param_shapes`)."""

from __future__ import annotations

import functools

from common.config import Config
from common.medmnist import DatasetInfo
from common.model import SmallCNN, build_model


def new_model(cfg: Config, info: DatasetInfo) -> SmallCNN:
    return build_model(in_channels=info.n_channels, num_classes=info.n_classes, seed=cfg.seed,
                       activation=cfg.activation)


def param_shapes(info: DatasetInfo) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, shape) of the model's parameters for a dataset, in order (built once per process)."""
    return _param_shapes(info.n_channels, info.n_classes)


@functools.lru_cache(maxsize=32)
def _param_shapes(in_channels: int, num_classes: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    model = build_model(in_channels=in_channels, num_classes=num_classes, seed=0)
    return tuple((k, tuple(p.shape)) for k, p in model.named_parameters())
