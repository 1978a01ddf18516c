"""Unit tests of the functional MAML maths on tiny models with worked answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.adaptation import finetune
from common.algorithms import Algorithm
from common.maml import (
    adapt, evaluate, loss_fn, mean_gradient, meta_update, per_sample_gradients, plain_gradient_fn,
)
from common.model import SmallCNN, build_model, get_params


def tiny_linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(3, 2).double()


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (n,), generator=g)


def test_one_inner_step_matches_hand_calculation() -> None:
    model = tiny_linear()
    theta = get_params(model)
    x, y = data(4, 1)
    # Hand calculation: softmax CE gradient for a linear layer is (p - onehot)^T x / n.
    logits = x @ theta["weight"].T + theta["bias"]
    p = torch.softmax(logits, dim=1)
    err = (p - torch.nn.functional.one_hot(y, 2).double()) / x.shape[0]
    expected_w = theta["weight"] - 0.5 * err.T @ x
    expected_b = theta["bias"] - 0.5 * err.sum(0)
    phi, _ = adapt(theta, [(x, y)], inner_lr=0.5, gradient_fn=plain_gradient_fn(model), first_order=True)
    torch.testing.assert_close(phi["weight"], expected_w)
    torch.testing.assert_close(phi["bias"], expected_b)


def _query_loss_after_adaptation(model, theta, support, query, lr, steps):
    phi = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
    for _ in range(steps):
        g, _ = mean_gradient(model, phi, *support, create_graph=True)
        phi = {k: phi[k] - lr * g[k] for k in phi}
    return loss_fn(model, phi, *query)


def test_second_order_maml_matches_finite_differences_and_differs_from_first_order() -> None:
    model = tiny_linear(3)
    theta = get_params(model)
    support, query = data(6, 4), data(5, 5)
    upd = meta_update(theta, algorithm=Algorithm.MAML, support=[support, support], query=query, inner_lr=0.8,
                      gradient_fn=plain_gradient_fn(model), model=model)
    fo = meta_update(theta, algorithm=Algorithm.FOMAML, support=[support, support], query=query, inner_lr=0.8,
                     gradient_fn=plain_gradient_fn(model), model=model)
    # central finite differences of L_query(adapt(theta)) in float64
    eps = 1e-6
    for name in theta:
        flat = theta[name].flatten()
        for i in range(flat.numel()):
            plus = {k: v.clone() for k, v in theta.items()}
            minus = {k: v.clone() for k, v in theta.items()}
            plus[name].view(-1)[i] += eps
            minus[name].view(-1)[i] -= eps
            fd = (_query_loss_after_adaptation(model, plus, support, query, 0.8, 2)
                  - _query_loss_after_adaptation(model, minus, support, query, 0.8, 2)) / (2 * eps)
            assert abs(float(fd) - float(upd.delta[name].view(-1)[i])) < 1e-6
    diff = max(float((upd.delta[k] - fo.delta[k]).abs().max()) for k in theta)
    assert diff > 1e-4, "second-order and first-order meta-gradients should differ on a curved loss"


def test_meta_gradient_reaches_every_parameter_of_the_cnn() -> None:
    model = build_model(in_channels=3, num_classes=4, seed=0)
    theta = get_params(model)
    g = torch.Generator().manual_seed(0)
    support = (torch.randn(6, 3, 28, 28, generator=g), torch.randint(0, 4, (6,), generator=g))
    query = (torch.randn(6, 3, 28, 28, generator=g), torch.randint(0, 4, (6,), generator=g))
    for algo in Algorithm:
        upd = meta_update(theta, algorithm=algo, support=[support] * 2, query=query, inner_lr=0.1,
                          gradient_fn=plain_gradient_fn(model), model=model)
        assert set(upd.delta) == set(theta)
        for k, v in upd.delta.items():
            assert v.shape == theta[k].shape
            assert torch.isfinite(v).all() and v.abs().sum() > 0, (algo, k)


def test_reptile_update_is_theta_minus_adapted_weights_and_module_untouched() -> None:
    model = tiny_linear(5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    theta = get_params(model)
    batches = [data(4, 10), data(4, 11), data(4, 12)]
    phi, _ = adapt(theta, batches, inner_lr=0.3, gradient_fn=plain_gradient_fn(model), first_order=True)
    upd = meta_update(theta, algorithm=Algorithm.REPTILE, support=batches, query=None, inner_lr=0.3,
                      gradient_fn=plain_gradient_fn(model), model=model)
    for k in theta:
        torch.testing.assert_close(upd.delta[k], theta[k] - phi[k])
        torch.testing.assert_close(model.state_dict()[k], before[k])  # nothing mutated the module


def test_per_sample_gradients_match_one_at_a_time_autograd() -> None:
    model = SmallCNN(in_channels=1, num_classes=3)
    theta = get_params(model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 1, 28, 28, generator=g), torch.randint(0, 3, (5,), generator=g)
    ps, losses = per_sample_gradients(model, theta, x, y)
    for i in range(5):
        leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        gi, li = mean_gradient(model, leaves, x[i:i + 1], y[i:i + 1])
        torch.testing.assert_close(losses[i], li.detach(), atol=1e-5, rtol=1e-5)
        for k in theta:
            torch.testing.assert_close(ps[k][i], gi[k], atol=1e-5, rtol=1e-4)
    empty, empty_losses = per_sample_gradients(model, theta, x[:0], y[:0])
    assert all(v.shape[0] == 0 for v in empty.values()) and empty_losses.shape == (0,)


def test_finetune_fits_the_support_set_and_evaluate_reports_auc() -> None:
    model = tiny_linear(7).float()
    theta = get_params(model)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, generator=g)
    y = (x[:, 0] > 0).long()
    before = evaluate(model, theta, x, y, num_classes=2)
    phi = finetune(model, theta, x, y, method="sgd", steps=200, lr=0.5)
    after = evaluate(model, phi, x, y, num_classes=2)
    assert after.loss < before.loss
    assert after.accuracy >= 0.9 and after.auc >= 0.95
    single = evaluate(model, phi, x[y == 1], y[y == 1], num_classes=2)
    assert single.auc != single.auc  # NaN: AUC is undefined on one class


def test_evaluate_in_chunks_scores_every_record_as_one_batch_would() -> None:
    """A set of 2.5 chunks: loss, accuracy and AUC equal those from one forward pass over all records
    (a dropped, repeated or reordered chunk changes them: the labels depend on the record)."""
    from sklearn.metrics import roc_auc_score

    from common.maml import EVAL_CHUNK, forward

    model = build_model(in_channels=1, num_classes=2, seed=0)
    theta = get_params(model)
    g = torch.Generator().manual_seed(5)
    n = EVAL_CHUNK * 5 // 2
    x = torch.randn(n, 1, 28, 28, generator=g)
    with torch.no_grad():
        logits = forward(model, theta, x)
    y = (logits[:, 1] > logits[:, 1].median()).long()  # scores rank the records well: AUC near 1
    y[::7] = 1 - y[::7]
    got = evaluate(model, theta, x, y, num_classes=2)
    prob = torch.softmax(logits, 1).double().numpy()
    assert got.loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)
    assert got.accuracy == pytest.approx(float((prob.argmax(1) == y.numpy()).mean()))
    assert got.auc == pytest.approx(roc_auc_score(y.numpy(), prob[:, 1]), abs=1e-6)


def test_local_meta_update_one_episode_is_the_classic_update_and_several_compose() -> None:
    from common.maml import Episode, local_meta_update

    model = tiny_linear(1)
    theta = get_params(model)
    fn = plain_gradient_fn(model)
    s1, q1 = data(8, 1), data(8, 2)
    s2, q2 = data(8, 3), data(8, 4)
    for algo in (Algorithm.FOMAML, Algorithm.REPTILE):
        classic = meta_update(theta, algorithm=algo, support=[s1, s1], query=q1, inner_lr=0.2,
                              gradient_fn=fn, model=model)
        one = local_meta_update(theta, algorithm=algo, episodes=[Episode([s1, s1], q1)], inner_lr=0.2,
                                local_lr=1.0, gradient_fn=fn, model=model)
        for k in theta:
            torch.testing.assert_close(one.delta[k], classic.delta[k])
    # two FOMAML episodes = two local outer steps at beta on the local copy
    beta = 0.3
    two = local_meta_update(theta, algorithm=Algorithm.FOMAML, episodes=[Episode([s1], q1), Episode([s2], q2)],
                            inner_lr=0.2, local_lr=beta, gradient_fn=fn, model=model)
    local = dict(theta)
    for s, q in ((s1, q1), (s2, q2)):
        g = meta_update(local, algorithm=Algorithm.FOMAML, support=[s], query=q, inner_lr=0.2, gradient_fn=fn,
                        model=model).delta
        local = {k: local[k] - beta * g[k] for k in local}
    for k in theta:
        torch.testing.assert_close(two.delta[k], theta[k] - local[k])
    # FedAvg: plain local SGD, one batch per episode
    fed = local_meta_update(theta, algorithm=Algorithm.FEDAVG, episodes=[Episode([s1], None), Episode([s2], None)],
                            inner_lr=0.2, local_lr=beta, gradient_fn=fn, model=model)
    local = dict(theta)
    for s in (s1, s2):
        g, _ = mean_gradient(model, {k: v.detach().requires_grad_(True) for k, v in local.items()}, *s)
        local = {k: (local[k] - beta * g[k]).detach() for k in local}
    for k in theta:
        torch.testing.assert_close(fed.delta[k], theta[k] - local[k])


def test_anil_inner_loop_adapts_the_head_alone_and_the_query_gradient_reaches_the_body() -> None:
    from common.maml import local_meta_update, Episode
    from common.model import head_names

    model = build_model(in_channels=1, num_classes=2, seed=0)
    theta = get_params(model)
    head = head_names(model)
    assert head == {"classifier.weight", "classifier.bias"}
    g = torch.Generator().manual_seed(3)
    sup = (torch.randn(6, 1, 28, 28, generator=g), torch.randint(0, 2, (6,), generator=g))
    qry = (torch.randn(6, 1, 28, 28, generator=g), torch.randint(0, 2, (6,), generator=g))
    fn = plain_gradient_fn(model)
    phi, _ = adapt(theta, [sup, sup], inner_lr=0.5, gradient_fn=fn, first_order=True, inner_names=head)
    for k in theta:
        moved = not torch.equal(phi[k], theta[k])
        assert moved == (k in head), k
    # the head's two steps equal the full inner loop's head steps with the body frozen at theta
    h = {k: theta[k] for k in head}
    for _ in range(2):
        leaves = {k: v.detach().requires_grad_(True) for k, v in h.items()}
        gr, _ = mean_gradient(model, {**theta, **leaves}, *sup, only=head)
        h = {k: (leaves[k] - 0.5 * gr[k]).detach() for k in head}
    for k in head:
        torch.testing.assert_close(phi[k], h[k])
    for first_order in (True, False):  # FOMAML and MAML: the meta-gradient covers every parameter
        u = meta_update(theta, algorithm=Algorithm.FOMAML if first_order else Algorithm.MAML, support=[sup], query=qry,
                        inner_lr=0.5, gradient_fn=fn, model=model, inner_names=head)
        assert set(u.delta) == set(theta) and all(float(v.abs().sum()) > 0 for v in u.delta.values())
    # one call of the gradient oracle per inner step and per query, exactly as without ANIL (the charge)
    calls = []

    def counting(params, batch, create_graph, only=None):
        calls.append(only)
        return fn(params, batch, create_graph, only)

    local_meta_update(theta, algorithm=Algorithm.FOMAML, episodes=[Episode([sup, sup], qry)] * 3, inner_lr=0.1,
                      local_lr=0.5, gradient_fn=counting, model=model, inner_names=head)
    assert calls == [head, head, None] * 3


def test_the_activation_changes_the_function_but_no_weight() -> None:
    from common.config import ACTIVATIONS as CONFIG_ACTIVATIONS
    from common.model import ACTIVATIONS

    assert set(CONFIG_ACTIVATIONS) == set(ACTIVATIONS)
    relu = build_model(in_channels=1, num_classes=2, seed=3, activation="relu")
    tanh = build_model(in_channels=1, num_classes=2, seed=3)  # the default, as pyproject's
    for (k, a), (k2, b) in zip(relu.named_parameters(), tanh.named_parameters()):
        assert k == k2 and torch.equal(a, b)
    assert sum(isinstance(m, torch.nn.Tanh) for m in tanh.modules()) == 3
    assert not any(isinstance(m, torch.nn.ReLU) for m in tanh.modules())
    x = torch.randn(4, 1, 28, 28)
    assert not torch.allclose(relu(x), tanh(x))
    with pytest.raises(ValueError, match="unknown activation"):
        build_model(in_channels=1, num_classes=2, seed=3, activation="gelu")
