"""The diagnostic model: a small GroupNorm CNN sized for MedMNIST (Opacus-compatible, no BatchNorm)."""

from __future__ import annotations

import torch
from torch import nn

Params = dict[str, torch.Tensor]


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


class SmallCNN(nn.Module):
    """conv3x3(32)-GN-act-pool, conv3x3(64)-GN-act-pool, conv3x3(64)-GN-act, global pool, linear.

    Global average pooling makes it work for every MedMNIST size (28, 64, 128, 224); channels and
    classes come from the dataset's `INFO`. GroupNorm keeps per-sample gradients well defined. The
    activation (`ACTIVATIONS`) has no parameters, so it changes no shape: a bounded one (tanh) keeps
    activations, and so per-record gradient norms, from growing during DP training (Papernot et al.,
    "Tempered sigmoid activations for deep learning with differential privacy", AAAI 2021).
    """

    def __init__(self, *, in_channels: int, num_classes: int, width: int = 32, groups: int = 8,
                 activation: str = "tanh") -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 2:
            raise ValueError(
                f"SmallCNN needs in_channels >= 1 and num_classes >= 2, got {in_channels}, {num_classes}"
            )
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}")
        act = ACTIVATIONS[activation]
        w2 = 2 * width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.GroupNorm(groups, width),
            act(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, w2, 3, padding=1),
            nn.GroupNorm(groups, w2),
            act(),
            nn.MaxPool2d(2),
            nn.Conv2d(w2, w2, 3, padding=1),
            nn.GroupNorm(groups, w2),
            act(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(w2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(*, in_channels: int, num_classes: int, seed: int, activation: str = "tanh") -> SmallCNN:
    """A freshly initialised model, identical for identical arguments (the activation changes no weight)."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return SmallCNN(in_channels=in_channels, num_classes=num_classes, activation=activation)
    finally:
        torch.random.set_rng_state(gen_state)


def head_names(model: nn.Module) -> frozenset[str]:
    """Names of the parameters of the model's last linear layer (the head ANIL adapts)."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ValueError(f"{type(model).__name__} has no linear layer to serve as a head")
    return frozenset(f"{last}.{p}" if last else p for p, _ in model.get_submodule(last).named_parameters())


def norm_names(model: nn.Module) -> frozenset[str]:
    """Names of the normalisation layers' affine parameters (what ``norm-adam`` adapts to a new scanner)."""
    norms = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)
    names = frozenset(f"{m}.{p}" for m, module in model.named_modules() if isinstance(module, norms)
                      for p, _ in module.named_parameters(recurse=False))
    if not names:
        raise ValueError(f"{type(model).__name__} has no normalisation layer with affine parameters")
    return names


def get_params(model: nn.Module) -> Params:
    """Detached copies of the model's parameters, in registration order."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}
