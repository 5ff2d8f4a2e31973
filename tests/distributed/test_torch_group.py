"""``group=`` with a torch ``ProcessGroup``: the class axis split over 2 gloo ranks (issue 11, items 1 and 4).

Each test starts 2 processes through :mod:`_ranks` (a rank's error or a hang fails it within
the timeout). A rank computes every case (equal shards, uneven shards with ``class_offset``,
each option, dtypes, ``cross_entropy_and_grad``, ``logsumexp``/``log_softmax``) and returns its
deviations from the unsharded call on the same data; the test asserts them by case, so that
one spawn covers the grid. Errors that depend on one rank's data are raised on every rank.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from _cases import sharded_options
from _ranks import ONLY_DISTRIBUTED, outcomes, run_ranks

pytestmark = ONLY_DISTRIBUTED

C_EQUAL, C_UNEVEN = 12, 11
#: layout -> (global C, (offset, C_local) of rank 0 and rank 1, pass class_offset)
LAYOUTS = {
    "equal": (C_EQUAL, ((0, 6), (6, 6)), False),
    "uneven": (C_UNEVEN, ((0, 5), (5, 6)), True),
    "uneven-swapped": (C_UNEVEN, ((6, 5), (0, 6)), True),  # rank 0 holds the upper classes
}
OPTIONS = sharded_options(ignore_class=4)
#: relative tolerance per dtype (values and gradients against the unsharded call in that dtype)
TOL = {"float64": 1e-12, "float32": 2e-6, "bfloat16": 2e-2}


def _data(num_classes: int, dtype, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, num_classes, generator=g, dtype=torch.float64) * 3
    # a target on each side of every shard boundary, the last class, and ignored rows
    target = torch.tensor([0, 4, 5, 6, 7, num_classes - 1, -100, 2, 10 % num_classes])
    probs = torch.softmax(torch.randn(9, num_classes, generator=g, dtype=torch.float64), -1)
    weight = torch.rand(num_classes, generator=g, dtype=torch.float64) + 0.5
    return x.to(dtype), target, probs.to(dtype), weight.to(dtype)


def _deviation(actual, expected) -> float:
    """max |a - e| / max(1, max |e|), in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).abs().max() / max(1.0, float(e.abs().max())))


def _values_and_gradients(rank: int, world_size: int) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    import multixent as mx

    out: dict[str, float] = {}
    pair = dist.new_group([0, 1])  # an explicit group as well as WORLD
    cases = [(layout, option, "float64") for layout in LAYOUTS for option in OPTIONS]
    cases += [("uneven", o, d) for o in ("every-option-sum", "probs-smoothing-weight") for d in ("float32", "bfloat16")]
    for layout, option, dtype_name in cases:
        num_classes, shards, explicit = LAYOUTS[layout]
        offset, local = shards[rank]
        spec, dtype = OPTIONS[option], getattr(torch, dtype_name)
        x, target, probs, weight = _data(num_classes, dtype)
        kw = {k: v for k, v in spec.items() if k not in ("weight", "probs")}
        if spec.get("weight"):
            kw["weight"] = weight
        if "ignore_index" in kw:
            target = torch.where(target == -100, kw["ignore_index"], target)
        full_target = probs if spec.get("probs") else target
        part = slice(offset, offset + local)
        local_target = probs[:, part] if spec.get("probs") else target
        group = pair if option == "plain" else dist.group.WORLD
        shard_kw = {"group": group, "class_offset": offset if explicit else None, **kw}
        upstream = torch.arange(1.0, 10.0, dtype=dtype) if spec.get("reduction") == "none" else 1.0

        x_local = x[:, part].clone().requires_grad_()
        loss = mx.cross_entropy(x_local, local_target, **shard_kw)
        (upstream * loss).sum().backward()
        x_full = x.clone().requires_grad_()
        expected = mx.cross_entropy(x_full, full_target, **kw)
        (upstream * expected).sum().backward()
        name = f"{layout}-{option}-{dtype_name}"
        out[f"{name}-value"] = _deviation(loss, expected)
        out[f"{name}-grad"] = _deviation(x_local.grad, x_full.grad[:, part])
        if spec.get("reduction") != "none":
            both, grad = mx.cross_entropy_and_grad(x[:, part], local_target, **shard_kw)
            out[f"{name}-and_grad-value"] = _deviation(both, expected)
            out[f"{name}-and_grad-grad"] = _deviation(grad, x_full.grad[:, part])

    for layout, (num_classes, shards, explicit) in LAYOUTS.items():
        offset, local = shards[rank]
        x = _data(num_classes, torch.float64)[0]
        part, shard_kw = (
            slice(offset, offset + local),
            {"group": dist.group.WORLD, "class_offset": offset if explicit else None},
        )
        for fn in (mx.logsumexp, mx.log_softmax):
            x_local, x_full = x[:, part].clone().requires_grad_(), x.clone().requires_grad_()
            value, expected = fn(x_local, **shard_kw), fn(x_full)
            torch.sin(value).sum().backward()
            torch.sin(expected).sum().backward()
            if fn is mx.log_softmax:
                expected = expected[:, part]
            out[f"{layout}-{fn.__name__}-value"] = _deviation(value, expected)
            out[f"{layout}-{fn.__name__}-grad"] = _deviation(x_local.grad, x_full.grad[:, part])
    return out


@pytest.fixture(scope="module")
def deviations() -> list[dict[str, float]]:
    return run_ranks(_values_and_gradients, 2, timeout=600)


def _names() -> list[str]:
    names = [f"{layout}-{option}-float64" for layout in LAYOUTS for option in OPTIONS]
    names += [
        f"uneven-{o}-{d}" for o in ("every-option-sum", "probs-smoothing-weight") for d in ("float32", "bfloat16")
    ]
    return names


@pytest.mark.parametrize("name", _names())
def test_cross_entropy_equals_the_unsharded_call(deviations, name):
    tol = TOL[name.rsplit("-", 1)[1]]
    for rank, dev in enumerate(deviations):
        keys = [k for k in dev if k.startswith(name + "-")]
        assert len(keys) >= 2, keys
        bad = {k: v for k, v in dev.items() if k in keys and not v <= tol}
        assert not bad, f"rank {rank}: {bad} (tolerance {tol})"


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("fn", ["logsumexp", "log_softmax"])
def test_logsumexp_and_log_softmax(deviations, layout, fn):
    for rank, dev in enumerate(deviations):
        for what in ("value", "grad"):
            assert dev[f"{layout}-{fn}-{what}"] <= TOL["float64"], (rank, what)


def _same(actual, expected) -> None:
    if _deviation(actual, expected) > 1e-12:
        raise AssertionError(f"{actual} != {expected}")


def _z_loss_gradient(half, x, target, rank: int, world) -> None:
    """z_loss as a tensor requiring grad with a group: the loss, this rank's logits gradient and the
    whole z_loss gradient (on every rank) equal the unsharded call's."""
    import torch

    import multixent as mx

    z, z_ref = (torch.tensor(1e-2, dtype=torch.float64, requires_grad=True) for _ in range(2))
    half = half.clone().requires_grad_()
    full = x.clone().requires_grad_()
    loss = mx.cross_entropy(half, target, group=world, z_loss=z, label_smoothing=0.1)
    expected = mx.cross_entropy(full, target, z_loss=z_ref, label_smoothing=0.1)
    loss.backward()
    expected.backward()
    _same(loss, expected)
    _same(z.grad, z_ref.grad)
    _same(half.grad, full.grad[:, 6 * rank : 6 * rank + 6])


def _errors(rank: int, world_size: int) -> dict[str, str]:
    """Each case's error on this rank (type: message), or "none"."""
    import torch
    import torch.distributed as dist

    import multixent as mx

    world = dist.group.WORLD
    x, target, _, weight = _data(C_EQUAL, torch.float64)
    half = x[:, 6 * rank : 6 * rank + 6]
    bad_target = target.clone()
    bad_target[3] = C_EQUAL if rank == 1 else 3  # out of range on rank 1 only
    cases = {
        "target-out-of-range-on-one-rank": lambda: mx.cross_entropy(half, bad_target, group=world),
        "unequal-shards-without-offsets": lambda: mx.cross_entropy(x[:, : 5 + rank], target, group=world),
        "offset-on-one-rank-only": lambda: mx.cross_entropy(
            half, target, group=world, class_offset=0 if rank else None
        ),
        "overlapping-offsets": lambda: mx.cross_entropy(half, target, group=world, class_offset=3 * rank),
        "numpy-on-one-rank": lambda: mx.cross_entropy(
            half.numpy() if rank else half, target.numpy() if rank else target, group=world
        ),
        "local-weight-instead-of-full": lambda: mx.cross_entropy(half, target, group=world, weight=weight[:6]),
        "weight-requiring-grad": lambda: mx.cross_entropy(
            half, target, group=world, weight=weight.clone().requires_grad_()
        ),
        "compiled": lambda: _same(
            torch.compile(lambda a, b: mx.cross_entropy(a, b, group=world), backend="eager")(half, target),
            mx.cross_entropy(half, target, group=world),
        ),
        "integer-logits-on-one-rank": lambda: mx.cross_entropy(half.long() if rank else half, target, group=world),
        "target-shape-on-one-rank": lambda: mx.cross_entropy(half, target[: 9 - rank], group=world),
        "linear-hidden-shape-on-one-rank": lambda: mx.linear_cross_entropy(
            torch.randn(9, 4 + rank, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64), target, group=world
        ),
        "linear-target-out-of-range-on-one-rank": lambda: mx.linear_cross_entropy(
            torch.randn(9, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64), bad_target, group=world
        ),
        "negative-offset": lambda: mx.cross_entropy(half, target, group=world, class_offset=-1),
        # array options (issue 13): a tensor autograd does not record is read as a float; z_loss as a tensor
        # requiring grad gets the whole gradient on every rank; label_smoothing/softcap requiring grad are refused
        "tensor-options-not-recorded": lambda: _same(
            mx.cross_entropy(
                half, target, group=world, label_smoothing=torch.tensor(0.1, dtype=x.dtype), softcap=x.new_tensor(3.0)
            ),
            mx.cross_entropy(x, target, label_smoothing=0.1, softcap=3.0),
        ),
        "z-loss-tensor-requiring-grad": lambda: _z_loss_gradient(half, x, target, rank, world),
        "smoothing-tensor-requiring-grad": lambda: mx.cross_entropy(
            half, target, group=world, label_smoothing=torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        ),
        "ok-after-the-errors": lambda: mx.cross_entropy(half, target, group=world),
    }
    return outcomes(cases)


@pytest.fixture(scope="module")
def errors() -> list[dict[str, str]]:
    return run_ranks(_errors, 2, timeout=300)


#: case -> (error on rank 0, error on rank 1): "Type: regex"
EXPECTED_ERRORS = {
    "target-out-of-range-on-one-rank": (r"IndexError: .*class index 12 .*0 <= index < 12.*\[raised on rank 1 ",) * 2,
    "unequal-shards-without-offsets": (r"ValueError: .*sizes \[5, 6\] .*need class_offset",) * 2,
    "offset-on-one-rank-only": ("ValueError: .*class_offset is given on some members",) * 2,
    "overlapping-offsets": (r"ValueError: .*do not tile \[0, C\)",) * 2,
    "numpy-on-one-rank": (r"TypeError: .*must be torch tensors on every member; got \['numpy'\] \[raised on rank 1 ",)
    * 2,
    "local-weight-instead-of-full": (r"ValueError: .*weight must have shape \(12,\)",) * 2,
    "weight-requiring-grad": ("NotImplementedError: .*class weights that require grad with group=",) * 2,
    # dynamo runs the collectives eagerly (a graph break) or the adapter refuses: never a wrong number
    "compiled": ("none|NotImplementedError: .*torch.compile",) * 2,
    "integer-logits-on-one-rank": ("TypeError: .*logits must have a real floating dtype.*\\[raised on rank 1 ",) * 2,
    "target-shape-on-one-rank": (r"ValueError: .*target of shape \(8,\) does not fit.*\[raised on rank 1 ",) * 2,
    "linear-hidden-shape-on-one-rank": (
        r"ValueError: .*hidden of shape \(9, 5\) does not fit classifier.*\[raised on rank 1 ",
    )
    * 2,
    "linear-target-out-of-range-on-one-rank": (r"IndexError: .*class index 12 .*0 <= index < 12.*\[raised on rank 1 ",)
    * 2,
    "negative-offset": ("ValueError: .*class_offset must be >= 0",) * 2,
    "tensor-options-not-recorded": ("none",) * 2,
    "z-loss-tensor-requiring-grad": ("none",) * 2,
    "smoothing-tensor-requiring-grad": (
        "NotImplementedError: .*label_smoothing or softcap as a tensor that requires grad, with group=",
    )
    * 2,
    "ok-after-the-errors": ("none",) * 2,
}


@pytest.mark.parametrize("case", list(EXPECTED_ERRORS))
def test_errors_are_raised_on_every_rank(errors, case):
    """No rank is left waiting in a collective: every rank raises the same error (or, last, every rank succeeds)."""
    import re

    assert errors[0][case] == errors[1][case], (errors[0][case], errors[1][case])
    for rank, expected in enumerate(EXPECTED_ERRORS[case]):
        assert re.match(expected, errors[rank][case], re.S), (rank, errors[rank][case])


def _accelerator_strategy(rank: int, world_size: int) -> dict[str, str]:
    """The accelerator strategy forced on CPU tensors, with a group: the class indices are read on the host
    (the members agree there anyway), so that an index out of range on one member is the IndexError on
    every member, where a device-side assertion would stop that member alone; in range, the unsharded
    call's values."""
    import torch
    import torch.nn.functional as F

    import multixent as mx
    from multixent import _compat

    _compat.ACCELERATOR_ON_CPU, _compat.SYNC_CHECKS = True, False
    world = torch.distributed.group.WORLD
    x, target, _, _ = _data(C_EQUAL, torch.float64)
    part = slice(6 * rank, 6 * rank + 6)
    h, w = torch.randn(9, 4, dtype=torch.float64), torch.randn(C_EQUAL, 4, dtype=torch.float64)
    one_rank = target.clone()
    one_rank[3] = C_EQUAL if rank == 1 else 3  # out of range on rank 1 only
    half = x[:, part].clone().requires_grad_()
    cases = {
        "out-of-range-on-one-rank": lambda: mx.cross_entropy(x[:, part], one_rank, group=world),
        "linear-out-of-range-on-one-rank": lambda: mx.linear_cross_entropy(h, w[part], one_rank, group=world),
        "in-range": lambda: _same(mx.cross_entropy(half, target, group=world), F.cross_entropy(x, target)),
    }
    return outcomes(cases)


def test_accelerator_strategy_with_a_group_raises_on_every_rank():
    import re

    results = run_ranks(_accelerator_strategy, 2, timeout=120)
    assert results[0] == results[1], results
    for case in ("out-of-range-on-one-rank", "linear-out-of-range-on-one-rank"):
        assert re.match(r"IndexError: .*class index 12 .*\[raised on rank 1 ", results[0][case], re.S), results
    assert results[0]["in-range"] == "none", results


LINEAR_OPTIONS = {
    "plain": {},
    "every-option": {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 3.0, "weight": True},
    "none": {"reduction": "none", "label_smoothing": 0.2, "weight": True},
    "chunks-sum": {"chunk_size": 3, "label_smoothing": 0.1, "reduction": "sum"},
}


def _linear(rank: int, world_size: int) -> dict[str, float]:
    """linear_cross_entropy with the classifier split by vocabulary rows (uneven: 5 and 6 of 11)."""
    import torch
    import torch.distributed as dist

    import multixent as mx

    g = torch.Generator().manual_seed(0)
    rows, dim, vocab = 9, 5, C_UNEVEN
    h, w = (
        torch.randn(rows, dim, generator=g, dtype=torch.float64),
        torch.randn(vocab, dim, generator=g, dtype=torch.float64),
    )
    b = torch.randn(vocab, generator=g, dtype=torch.float64)
    class_weight = torch.rand(vocab, generator=g, dtype=torch.float64) + 0.5
    target = _data(vocab, torch.float64)[1]
    offset, local = LAYOUTS["uneven-swapped"][1][rank]
    part = slice(offset, offset + local)
    out = {}
    for option, spec in LINEAR_OPTIONS.items():
        kw = {k: v for k, v in spec.items() if k != "weight"}
        mine = [h.clone(), w[part].clone(), b[part].clone(), class_weight.clone()]
        full = [h.clone(), w.clone(), b.clone(), class_weight.clone()]
        for a in (*mine, *full):
            a.requires_grad_()
        upstream = torch.arange(1.0, rows + 1, dtype=torch.float64) if kw.get("reduction") == "none" else 1.0
        losses = []
        for (hh, ww, bb, cw), extra in ((mine, {"group": dist.group.WORLD, "class_offset": offset}), (full, {})):
            loss = mx.linear_cross_entropy(
                hh, ww, target, bias=bb, weight=cw if spec.get("weight") else None, **kw, **extra
            )
            (upstream * loss).sum().backward()
            losses.append(loss)
        out[f"{option}-value"] = _deviation(*losses)
        expected = (full[0].grad, full[1].grad[part], full[2].grad[part], full[3].grad)
        for name, a, e in zip(("hidden", "classifier", "bias", "weight"), mine, expected, strict=True):
            if e is not None:
                out[f"{option}-{name}"] = _deviation(a.grad, e)
    return out


@pytest.fixture(scope="module")
def linear_deviations() -> list[dict[str, float]]:
    return run_ranks(_linear, 2, timeout=300)


@pytest.mark.parametrize("option", list(LINEAR_OPTIONS))
def test_linear_cross_entropy_column_parallel(linear_deviations, option):
    """The loss, this rank's classifier/bias rows' gradients, and the full hidden (and weight) gradient."""
    for rank, dev in enumerate(linear_deviations):
        mine = {k: v for k, v in dev.items() if k.startswith(option + "-")}
        assert len(mine) >= 4, mine
        assert all(v <= TOL["float64"] for v in mine.values()), (rank, mine)


def _group_after_destroy(rank: int, world_size: int) -> dict[str, bool]:
    """Whether a destroyed group is freed while a ``group=`` loss (its graph, after backward) is kept."""
    import gc
    import weakref

    import torch
    import torch.distributed as dist

    import multixent as mx

    group = dist.new_group([0, 1])
    x = torch.randn(4, 6, dtype=torch.float64).requires_grad_()
    loss = mx.cross_entropy(x, torch.tensor([0, 3, 7, 11]), group=group, label_smoothing=0.1)
    loss.backward()
    linear = mx.linear_cross_entropy(
        torch.randn(4, 3, dtype=torch.float64),
        torch.randn(6, 3, dtype=torch.float64).requires_grad_(),
        torch.tensor([0, 3, 7, 11]),
        group=group,
    )
    kept = weakref.ref(group)
    dist.destroy_process_group(group)
    del group
    gc.collect()
    return {"freed": kept() is None, "graph kept": loss.grad_fn is not None and linear.grad_fn is not None}


def test_a_kept_loss_does_not_keep_the_group_alive():
    """A graph holding the group keeps it (and gloo's threads) alive until the interpreter exits, where
    destroying them aborted the process (``terminate called without an active exception``)."""
    for result in run_ranks(_group_after_destroy, 2, timeout=300):
        assert result == {"freed": True, "graph kept": True}
