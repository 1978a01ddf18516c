"""Functional meta-learning maths over parameter dicts (`torch.func`), no Flower, no module mutation.

Algorithms (Finn et al. 2017, MAML; Nichol et al. 2018, Reptile / first-order MAML; McMahan et al.
2017, FedAvg), all through one inner loop, `adapt`:

- ``maml``: the query loss of the adapted weights, differentiated through the inner loop
  (second order, ``create_graph=True``).
- ``fomaml``: the same with ``first_order=True``: the query gradient taken at the adapted weights.
- ``reptile`` and ``fedavg``: the update ``theta - phi`` of the inner loop. They differ on the server:
  Reptile feeds it to the outer optimiser, FedAvg applies the mean update as it is.

Every gradient of the loss on patient records goes through a `GradientFn`: plain mean gradients
here, or the clipped-and-noised release from `common.privacy` when DP is on.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from common.algorithms import Algorithm

Params = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]


def forward(model: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """Logits of `model` evaluated with `params` instead of its own parameters."""
    return functional_call(model, params, (x,))


def loss_fn(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (binary, multi-class and ordinal MedMNIST tasks are all single-label)."""
    return F.cross_entropy(forward(model, params, x), y)


def mean_gradient(
    model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, *, create_graph: bool = False,
    only: frozenset[str] | None = None,
) -> tuple[Params, torch.Tensor]:
    """Gradient of the mean loss with respect to `params` (or the names in `only`), and the loss itself."""
    names = [n for n in params if only is None or n in only]
    loss = loss_fn(model, params, x, y)
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph)
    return dict(zip(names, grads)), loss


# Per-sample-gradient engines; `per_sample_gradients` is the one place that chooses between them.
# All engines give the same per-record gradients (to float rounding, tested); they differ only in speed.
# The default was chosen by measurement (`python -m simulations.benchmark`: per call and per DP
# round, interleaved, every engine on the same batches): the closed-form ``layers`` engine was the
# fastest; the figures are in docs/results/benchmark/benchmark.json (``engines`` and
# ``dp.dp_overhead_by_engine``), explained in docs/results/benchmark/README.md.
PER_SAMPLE_ENGINES = ("vmap", "ew", "hooks", "layers")
DEFAULT_PER_SAMPLE_ENGINE = "layers"


def per_sample_gradients(
    model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, *, engine: str | None = None
) -> tuple[Params, torch.Tensor]:
    """Per-record gradients ``{name: (B, *shape)}`` and per-record losses ``(B,)``.

    Engines: ``vmap`` (``torch.func.vmap(grad(...))``, each record run as a batch of one),
    ``ew`` (PyTorch's ExpandedWeights, what Opacus' ``grad_sample_mode="ew"`` uses), ``hooks``
    (Opacus' `GradSampleModule`) and ``layers`` (`common.per_sample`: one batched backward to
    each layer's output, then closed-form per-record parameter gradients). Nothing mixes records
    (GroupNorm normalises within a sample), so all compute the same quantity. An empty batch
    gives empty leading dimensions.
    """
    engine = engine or DEFAULT_PER_SAMPLE_ENGINE
    if engine not in PER_SAMPLE_ENGINES:
        raise ValueError(f"unknown per-sample gradient engine {engine!r}; use one of {PER_SAMPLE_ENGINES}")
    detached = {k: v.detach() for k, v in params.items()}
    if x.shape[0] == 0:
        return {k: v.new_zeros((0, *v.shape)) for k, v in detached.items()}, x.new_zeros((0,))
    if engine == "vmap":
        return _per_sample_vmap(model, detached, x, y)
    if engine == "layers":
        from common.per_sample import per_sample_by_layers

        return per_sample_by_layers(_engine_copy(model, engine), detached, x, y)
    return _per_sample_module(model, detached, x, y, engine)


def _per_sample_vmap(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor) -> tuple[Params, torch.Tensor]:
    def one(p: Params, xi: torch.Tensor, yi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))
        return loss, loss

    grads, losses = vmap(grad(one, has_aux=True), in_dims=(None, 0, 0))(params, x, y)
    return grads, losses


# One private copy of each model architecture per engine, whose parameters are overwritten with (or,
# for ``layers``, replaced by) `params` per call: the caller's model is never mutated, and models
# built afresh for every round (same architecture) share one copy instead of a deepcopy per call.
_ENGINE_COPIES: dict[tuple[str, str], nn.Module] = {}


def _engine_copy(model: nn.Module, engine: str) -> nn.Module:
    key = (engine, f"{type(model).__module__}.{type(model).__qualname__}:{model!r}:"
                   f"{[(n, tuple(p.shape)) for n, p in model.named_parameters()]}")
    if key not in _ENGINE_COPIES:
        twin = copy.deepcopy(model)
        if engine == "hooks":
            from opacus import GradSampleModule

            twin = GradSampleModule(twin, loss_reduction="sum")
        _ENGINE_COPIES[key] = twin
    return _ENGINE_COPIES[key]


def _per_sample_module(
    model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, engine: str
) -> tuple[Params, torch.Tensor]:
    twin = _engine_copy(model, engine)
    inner = twin._module if engine == "hooks" else twin
    named = dict(inner.named_parameters())
    if set(named) != set(params):
        raise ValueError("params do not match the model's parameter names")
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(params[k])
            p.grad = None
            p.grad_sample = None
    if engine == "ew":
        from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

        logits = call_for_per_sample_grads(inner, batch_size=x.shape[0], loss_reduction="sum")(x)
    else:
        logits = twin(x)
    losses = F.cross_entropy(logits, y, reduction="none")
    with warnings.catch_warnings():
        # Opacus' hooks: the input needs no gradient, which is exactly our case
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        losses.sum().backward()
    grads = {k: p.grad_sample.detach() for k, p in named.items()}
    for p in named.values():
        p.grad = None
        p.grad_sample = None
    return grads, losses.detach()


@dataclass(frozen=True)
class GradientRelease:
    """One gradient computed from patient records, as it may be used downstream."""

    grads: Params
    loss: torch.Tensor  # scalar; the (possibly noised) mean loss of the batch


# A gradient oracle: (params, batch, create_graph[, only]) -> GradientRelease. With `only` (a set of
# parameter names) the release holds the gradient of those parameters alone (ANIL's inner loop);
# the forward pass still uses every parameter.
GradientFn = Callable[..., GradientRelease]
# (model, params, x, y) -> (per-record gradients {name: (B, *shape)}, per-record losses (B,))
PerSampleFn = Callable[[nn.Module, Params, torch.Tensor, torch.Tensor], tuple[Params, torch.Tensor]]


def plain_gradient_fn(model: nn.Module, per_sample_fn: PerSampleFn | None = None) -> GradientFn:
    """Non-private gradients of the mean loss (differentiable when ``create_graph``).

    With `per_sample_fn` (first order only) the gradient is the mean of its per-record gradients;
    the privacy audit uses it to add gradient-space canaries to a run without DP.
    """

    def fn(params: Params, batch: Batch, create_graph: bool, only: frozenset[str] | None = None) -> GradientRelease:
        x, y = batch
        if x.shape[0] == 0:
            return GradientRelease({k: torch.zeros_like(v) for k, v in params.items() if only is None or k in only},
                                   torch.tensor(float("nan")))
        if per_sample_fn is not None:
            if create_graph:
                raise ValueError("per_sample_fn gives first-order gradients only")
            grads, losses = per_sample_fn(model, {k: v.detach() for k, v in params.items()}, x, y)
            return GradientRelease({k: v.mean(0) for k, v in grads.items() if only is None or k in only},
                                   losses.detach().mean())
        if not create_graph:  # first order: differentiate at these weights, as fresh leaves
            params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        g, loss = mean_gradient(model, params, x, y, create_graph=create_graph, only=only)
        if not create_graph:
            g = {k: v.detach() for k, v in g.items()}
        return GradientRelease(g, loss.detach())

    return fn


def adapt(
    params: Params,
    support: Iterable[Batch],
    *,
    inner_lr: float,
    gradient_fn: GradientFn,
    first_order: bool,
    inner_names: frozenset[str] | None = None,
) -> tuple[Params, list[torch.Tensor]]:
    """Inner loop: one SGD step ``phi <- phi - inner_lr * g`` per support batch.

    With ``first_order=False`` the steps stay in the autograd graph (second-order MAML); the
    returned weights are then differentiable functions of `params`. With `inner_names` only those
    parameters adapt (ANIL, Raghu et al. 2020: the head), and only their gradient is released, so
    under DP the inner step's noise lives in their dimension alone. Returns the adapted weights
    and the loss of each step.
    """
    phi = dict(params)
    losses = []
    for batch in support:
        release = gradient_fn(phi, batch, not first_order) if inner_names is None else \
            gradient_fn(phi, batch, not first_order, inner_names)
        phi = {k: phi[k] - inner_lr * release.grads[k] if k in release.grads else phi[k] for k in phi}
        if first_order:
            phi = {k: v.detach() for k, v in phi.items()}
        losses.append(release.loss)
    return phi, losses


@dataclass(frozen=True)
class MetaUpdate:
    """What a hospital sends back: `delta`, the direction the server steps theta against, and the reported loss.

    `delta` is ``theta - theta_local`` from `local_meta_update` (for every algorithm) and ``theta - phi``
    from `meta_update` for reptile/fedavg; only `meta_update` for maml/fomaml puts the meta-gradient in it.
    """

    delta: Params
    loss: float


def meta_update(
    theta: Params,
    *,
    algorithm: Algorithm,
    support: Iterable[Batch],
    query: Batch | None,
    inner_lr: float,
    gradient_fn: GradientFn,
    model: nn.Module,
    inner_names: frozenset[str] | None = None,
) -> MetaUpdate:
    """The hospital's contribution for one round, for any of the four algorithms.

    - maml/fomaml: the gradient of the query loss with respect to theta (through the inner loop
      for maml, at the adapted weights for fomaml). `query` is required.
    - reptile/fedavg: ``theta - phi``; the reported loss is that of the last inner step.
    """
    if algorithm.has_query and query is None:
        raise ValueError(f"algorithm {algorithm} needs a query batch")

    if algorithm.second_order:
        leaves = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
        phi, _ = adapt(leaves, support, inner_lr=inner_lr, gradient_fn=gradient_fn, first_order=False,
                       inner_names=inner_names)
        x, y = query  # type: ignore[misc]
        q_loss = loss_fn(model, phi, x, y)
        names = list(leaves)
        grads = torch.autograd.grad(q_loss, [leaves[n] for n in names])
        return MetaUpdate({n: g.detach() for n, g in zip(names, grads)}, float(q_loss.detach()))

    phi, losses = adapt(
        {k: v.detach() for k, v in theta.items()}, support,
        inner_lr=inner_lr, gradient_fn=gradient_fn, first_order=True, inner_names=inner_names,
    )
    if algorithm.has_query:
        release = gradient_fn(phi, query, False)  # type: ignore[arg-type]
        return MetaUpdate({k: v.detach() for k, v in release.grads.items()}, float(release.loss))
    delta = {k: (theta[k] - phi[k]).detach() for k in theta}
    return MetaUpdate(delta, float(losses[-1]) if losses else float("nan"))


@dataclass(frozen=True)
class Episode:
    """One local episode's batches: the inner loop's support batches and (for (FO)MAML) a query batch.

    FedAvg's episode is a single local step: one support batch, no query.
    """

    support: list[Batch]
    query: Batch | None


def local_meta_update(
    theta: Params,
    *,
    algorithm: Algorithm,
    episodes: Iterable[Episode],
    inner_lr: float,
    local_lr: float,
    gradient_fn: GradientFn,
    model: nn.Module,
    inner_names: frozenset[str] | None = None,
) -> MetaUpdate:
    """A round's local meta-training at one hospital; returns ``theta - theta_local`` (a pseudo meta-gradient).

    The hospital keeps its own copy ``theta_local`` of the initialisation and, per episode, takes a
    local outer step with learning rate ``local_lr`` (beta):

    - maml/fomaml: ``theta_local -= beta * g`` with g the meta-gradient of the episode (`meta_update`);
    - reptile: ``theta_local += beta * (phi - theta_local)``, phi the adapted weights;
    - fedavg: ``theta_local -= beta * g`` with g the gradient of the episode's one batch (plain local SGD).

    With one episode and beta = 1 this is exactly the single meta-gradient (FOMAML, MAML) or model
    delta (Reptile) of the classic one-step recipe; with several it is Per-FedAvg / FedMeta with local
    epochs, and FedAvg's local epochs of SGD. The reported loss is the mean of the episodes' released
    losses (query losses for (FO)MAML, the last inner loss for Reptile, the batch loss for FedAvg).
    Every gradient of patient records goes through `gradient_fn` (clipped and noised under DP).
    """
    local = {k: v.detach().clone() for k, v in theta.items()}
    losses: list[float] = []
    for ep in episodes:
        if algorithm.plain_local_sgd:
            if len(ep.support) != 1:
                raise ValueError("a FedAvg episode is one local step: exactly one batch")
            release = gradient_fn(local, ep.support[0], False)
            step, loss = release.grads, float(release.loss)
        else:
            u = meta_update(local, algorithm=algorithm, support=ep.support, query=ep.query,
                            inner_lr=inner_lr, gradient_fn=gradient_fn, model=model, inner_names=inner_names)
            step, loss = u.delta, u.loss
        local = {k: (local[k] - local_lr * step[k]).detach() for k in local}
        losses.append(loss)
    if not losses:
        raise ValueError("local meta-training needs at least one episode")
    finite = [v for v in losses if v == v]
    return MetaUpdate({k: (theta[k].detach() - local[k]).detach() for k in theta},
                      float(np.mean(finite)) if finite else float("nan"))


@dataclass(frozen=True)
class Scores:
    loss: float
    accuracy: float
    auc: float  # NaN when the evaluated set holds a single class


EVAL_CHUNK = 128  # records per forward pass when scoring


def predict_logits(model: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """Logits of every record, scored in chunks of `EVAL_CHUNK` without a graph.

    In chunks: the same logits (per-record layers only), and faster on a CPU than one batch of a
    whole query set (see docs/results/benchmark/README.md, "Scoring in chunks").
    """
    with torch.no_grad():
        detached = {k: v.detach() for k, v in params.items()}
        return torch.cat([forward(model, detached, xb) for xb in x.split(EVAL_CHUNK)])


def class_probabilities(logits: torch.Tensor) -> np.ndarray:
    """Softmax probabilities (n, classes) as float64, as `evaluate` scores them."""
    return torch.softmax(logits, dim=1).double().numpy()


def evaluate(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, *, num_classes: int) -> Scores:
    """Accuracy (argmax) and ROC-AUC as MedMNIST reports them (binary: class-1 score; else one-vs-rest mean)."""
    if x.shape[0] == 0:
        raise ValueError("cannot evaluate on an empty set")
    logits = predict_logits(model, params, x)
    loss = float(F.cross_entropy(logits, y))
    prob = class_probabilities(logits)
    labels = y.numpy()
    acc = float((prob.argmax(1) == labels).mean())
    return Scores(loss, acc, roc_auc(labels, prob, num_classes=num_classes))


def roc_auc(labels: np.ndarray, prob: np.ndarray, *, num_classes: int) -> float:
    """ROC-AUC as MedMNIST reports it: binary, the class-1 probability; else the one-vs-rest mean
    over the classes present (a class absent from the set has no AUC). NaN for a single class."""
    from sklearn.metrics import roc_auc_score

    present = np.unique(labels)
    if len(present) < 2:
        return float("nan")
    if num_classes == 2:
        return float(roc_auc_score(labels, prob[:, 1]))
    return float(np.mean([roc_auc_score(labels == c, prob[:, c]) for c in present]))


def batches_from(x: torch.Tensor, y: torch.Tensor, index_sets: Iterable[np.ndarray]) -> Iterator[Batch]:
    """Lazily index a site's tensors with each index array (e.g. a fresh Poisson draw per step)."""
    for idx in index_sets:
        t = torch.as_tensor(idx, dtype=torch.long)
        yield x[t], y[t]
