"""Every per-sample-gradient engine computes the same per-record gradients (the DP mechanism is unchanged)."""

from __future__ import annotations

import pytest
import torch

from common.maml import DEFAULT_PER_SAMPLE_ENGINE, PER_SAMPLE_ENGINES, per_sample_gradients
from common.model import build_model, get_params


@pytest.mark.parametrize(("channels", "classes", "batch"), [(1, 2, 16), (3, 5, 7), (1, 11, 1)])
def test_engines_match_vmap(channels: int, classes: int, batch: int) -> None:
    model = build_model(in_channels=channels, num_classes=classes, seed=0)
    gen = torch.Generator().manual_seed(1)
    params = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in get_params(model).items()}
    x = torch.randn(batch, channels, 28, 28, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    ref, ref_loss = per_sample_gradients(model, params, x, y, engine="vmap")
    for engine in PER_SAMPLE_ENGINES:
        for _ in range(2):  # a second call must not accumulate into the first
            g, loss = per_sample_gradients(model, params, x, y, engine=engine)
            assert set(g) == set(ref)
            for k in ref:
                assert g[k].shape == (batch, *params[k].shape)
                assert float((g[k] - ref[k]).abs().max()) < 1e-5, (engine, k)
            assert float((loss - ref_loss).abs().max()) < 1e-5
    # the caller's model is untouched (engines work on private copies)
    assert all(not hasattr(p, "grad_sample") or p.grad_sample is None for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("engine", PER_SAMPLE_ENGINES)
def test_empty_batch_gives_empty_gradients(engine: str) -> None:
    model = build_model(in_channels=1, num_classes=2, seed=0)
    params = get_params(model)
    g, loss = per_sample_gradients(model, params, torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long),
                                   engine=engine)
    assert loss.shape == (0,) and all(g[k].shape == (0, *params[k].shape) for k in params)


def test_unknown_engine_is_refused_and_default_is_known() -> None:
    assert DEFAULT_PER_SAMPLE_ENGINE in PER_SAMPLE_ENGINES
    model = build_model(in_channels=1, num_classes=2, seed=0)
    with pytest.raises(ValueError, match="engine"):
        per_sample_gradients(model, get_params(model), torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long),
                             engine="magic")
