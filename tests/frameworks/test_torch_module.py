"""``multixent.torch.CrossEntropyLoss`` against ``torch.nn.CrossEntropyLoss``: values, gradients, buffers, compile."""

from __future__ import annotations

import numpy as np
import pytest

OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"ignore_index": 2, "label_smoothing": 0.2},
    {"weighted": True, "label_smoothing": 0.1},
    {"weighted": True, "reduction": "none", "ignore_index": 0},
]


def _modules(torch, options, dtype=None):
    from multixent.torch import CrossEntropyLoss

    options = dict(options)
    weight = torch.tensor([0.5, 2.0, 1.0, 0.25], dtype=dtype) if options.pop("weighted", False) else None
    return CrossEntropyLoss(weight, **options), torch.nn.CrossEntropyLoss(weight, **options)


def _compare(torch, ours, theirs, x, y, rtol=1e-6):
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = ours(xa, y), theirs(xb, y)
    a.sum().backward()
    b.sum().backward()
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5, 2), (4,)], ids=str)
def test_matches_torch_module(torch_backend, options, shape):
    torch = torch_backend.modules["torch"]
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=shape), dtype=torch.float32)
    target_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    y = torch.tensor(rng.integers(0, 4, size=target_shape))
    _compare(torch, *_modules(torch, options), x, y)


def test_probability_targets(torch_backend):
    torch = torch_backend.modules["torch"]
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.normal(size=(5, 4, 3)), dtype=torch.float32)
    y = torch.softmax(torch.tensor(rng.normal(size=(5, 4, 3)), dtype=torch.float32), dim=1)
    _compare(torch, *_modules(torch, {"weighted": True, "label_smoothing": 0.1}), x, y)


def test_to_float64_moves_the_weight(torch_backend):
    torch = torch_backend.modules["torch"]
    ours, theirs = _modules(torch, {"weighted": True})
    ours, theirs = ours.to(torch.float64), theirs.to(torch.float64)
    assert ours.weight.dtype == torch.float64
    rng = np.random.default_rng(2)
    x = torch.tensor(rng.normal(size=(7, 4)), dtype=torch.float64)
    y = torch.tensor(rng.integers(0, 4, size=7))
    _compare(torch, ours, theirs, x, y, rtol=1e-12)


def test_state_dict_round_trip(torch_backend):
    torch = torch_backend.modules["torch"]
    from multixent.torch import CrossEntropyLoss

    saved, _ = _modules(torch, {"weighted": True})
    state = saved.state_dict()
    assert list(state) == ["weight"]
    loaded = CrossEntropyLoss(torch.zeros(4))
    loaded.load_state_dict(state)
    torch.testing.assert_close(loaded.weight, saved.weight)
    assert CrossEntropyLoss().state_dict() == {}
    # the same keys as torch's module: a checkpoint of one loads into the other
    assert set(torch.nn.CrossEntropyLoss(torch.ones(4)).state_dict()) == set(state)


def test_z_loss_softcap_and_last_axis(torch_backend):
    import multixent
    from multixent.torch import CrossEntropyLoss

    torch = torch_backend.modules["torch"]
    x, y = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    got = CrossEntropyLoss(z_loss=1e-2, softcap=3.0, axis=-1)(x, y)
    torch.testing.assert_close(got, multixent.cross_entropy(x, y, z_loss=1e-2, softcap=3.0))


def test_deprecated_arguments_are_refused(torch_backend):
    from multixent.torch import CrossEntropyLoss

    with pytest.raises(ValueError, match="size_average and reduce"):
        CrossEntropyLoss(size_average=False)
    with pytest.raises(ValueError, match="reduction="):
        CrossEntropyLoss(reduce=False)


def test_compile(torch_backend):
    torch = torch_backend.modules["torch"]
    ours, theirs = _modules(torch, {"weighted": True, "label_smoothing": 0.1})
    rng = np.random.default_rng(3)
    x = torch.tensor(rng.normal(size=(6, 4, 3)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 4, size=(6, 3)))
    _compare(torch, torch.compile(ours, fullgraph=True), theirs, x, y, rtol=1e-5)
