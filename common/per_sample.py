"""Per-record gradients in closed form, layer by layer (the ``layers`` engine of `common.maml`).

One ordinary batched forward pass records each parametrised layer's input; one backward pass of
the *summed* per-record losses gives each layer's output gradient, which for record ``i`` is the
gradient of record ``i``'s loss alone (no layer of the model mixes records: GroupNorm normalises
within a sample). Each parameter's per-record gradient then follows from that layer's input and
output gradient:

- ``Conv2d``: ``dW_i = dY_i @ unfold(X_i)^T`` (one batched matmul), ``db_i = sum_hw dY_i``;
- ``Linear``: ``dW_i = dY_i X_i^T``, ``db_i = dY_i``;
- ``GroupNorm``: ``dgamma_i = sum_hw dY_i * Xhat_i``, ``dbeta_i = sum_hw dY_i`` (``Xhat`` the
  normalised input).

This is the computation of Opacus' grad samplers for these layers, without module wrapping. A
model with any other parametrised layer (or a grouped/dilated convolution) is refused, so the
engine can never silently return a wrong gradient; `tests/test_per_sample.py` checks it
against ``vmap`` to 1e-5.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

Params = dict[str, torch.Tensor]
SUPPORTED = (nn.Conv2d, nn.Linear, nn.GroupNorm)

_LOCK = threading.Lock()  # the forward hooks live on a shared copy of the model: one caller at a time
_PLANS: "weakref.WeakKeyDictionary[nn.Module, list[tuple[str, nn.Module]]]" = weakref.WeakKeyDictionary()


def _plan(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The parametrised layers (name, module), checked to be ones this engine computes exactly."""
    if model not in _PLANS:
        layers = []
        for name, mod in model.named_modules():
            own = list(mod.named_parameters(recurse=False))
            if not own:
                continue
            if not isinstance(mod, SUPPORTED):
                raise ValueError(f"per-sample engine 'layers' does not support {type(mod).__name__} ({name}); "
                                 "use engine 'vmap'")
            if isinstance(mod, nn.Conv2d) and (mod.groups != 1 or mod.padding_mode != "zeros"
                                               or isinstance(mod.padding, str)):
                raise ValueError(f"per-sample engine 'layers' supports only plain convolutions ({name}); "
                                 "use engine 'vmap'")
            layers.append((name, mod))
        _PLANS[model] = layers
    return _PLANS[model]


def per_sample_by_layers(model: nn.Module, params: Params, x: torch.Tensor,
                         y: torch.Tensor) -> tuple[Params, torch.Tensor]:
    """``({name: (B, *shape)}, losses (B,))`` for a model of Conv2d / Linear / GroupNorm layers.

    Thread-safe: the model (a copy shared per architecture) carries hooks during the call, so calls
    are serialised.
    """
    with _LOCK:
        return _per_sample_by_layers(model, params, x, y)


def _per_sample_by_layers(model: nn.Module, params: Params, x: torch.Tensor,
                          y: torch.Tensor) -> tuple[Params, torch.Tensor]:
    layers = _plan(model)
    seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if mod in seen:
            raise ValueError("per-sample engine 'layers' needs each layer called once per forward pass")
        seen[mod] = (inputs[0].detach(), output)

    handles = [mod.register_forward_hook(keep) for _, mod in layers]
    try:
        leaf = {k: v.detach().requires_grad_(True) for k, v in params.items()}  # makes outputs differentiable
        logits = functional_call(model, leaf, (x,))
    finally:
        for h in handles:
            h.remove()
    losses = F.cross_entropy(logits, y, reduction="none")
    outputs = [seen[mod][1] for _, mod in layers]
    grads_out = torch.autograd.grad(losses.sum(), outputs)
    batch = x.shape[0]
    out: Params = {}
    for (name, mod), dy in zip(layers, grads_out):
        inp = seen[mod][0]
        prefix = f"{name}." if name else ""
        if isinstance(mod, nn.Conv2d):
            cols = F.unfold(inp, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
            dw = torch.bmm(dy.reshape(batch, dy.shape[1], -1), cols.transpose(1, 2))
            out[prefix + "weight"] = dw.reshape(batch, *mod.weight.shape)
            if mod.bias is not None:
                out[prefix + "bias"] = dy.sum(dim=(2, 3))
        elif isinstance(mod, nn.Linear):
            out[prefix + "weight"] = torch.einsum("bo,bi->boi", dy, inp)
            if mod.bias is not None:
                out[prefix + "bias"] = dy
        else:  # GroupNorm
            xhat = F.group_norm(inp, mod.num_groups, None, None, mod.eps)
            spatial = tuple(range(2, dy.dim()))
            if mod.weight is not None:
                out[prefix + "weight"] = (dy * xhat).sum(dim=spatial)
            if mod.bias is not None:
                out[prefix + "bias"] = dy.sum(dim=spatial)
    missing = set(params) - set(out)
    if missing:
        raise ValueError(f"per-sample engine 'layers' computed no gradient for {sorted(missing)}")
    return {k: out[k].detach() for k in params}, losses.detach()
