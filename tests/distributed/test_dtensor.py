"""torch DTensor logits (issue 11, item 2), on 2 gloo processes through :mod:`_ranks`.

Each rank builds the same full data from a seed, calls multixent on DTensors sharded over the
classes (``Shard(class axis)``), the batch (``Shard(0)``, or a middle axis) or both on a 2-D mesh,
and compares the value (its ``full_tensor()``), the placements, and the gradients (through
autograd and ``cross_entropy_and_grad``) with the unsharded call on the full data on the same
rank: float64 to 1e-12 relative, float32 within a multiple of its eps, bfloat16 (two layouts) within
2 eps. Every option; uneven shards; ignored targets on every shard, in different numbers per rank.
Errors (placements that cannot be handled, an out-of-range target on one rank) are raised on every
rank.

Each layout is one run of 2 processes (10-20 s on 2 busy cores); the cases inside it are all
checked, and every failing one is reported. Run by ``nox -s distributed`` (``MULTIXENT_DISTRIBUTED=1``;
skipped otherwise, so that the torch session does not run it a second time).
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("torch.distributed.tensor")

from _ranks import ONLY_DISTRIBUTED, run_ranks

pytestmark = ONLY_DISTRIBUTED

IGNORE = -100

#: name -> keyword arguments of cross_entropy ("probs": probability targets, "grad_weight": weight requires grad)
OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "ignore": {"ignore": True},
    "weight-ignore": {"weight": True, "ignore": True},
    "weight-ignore-none": {"weight": True, "ignore": True, "reduction": "none"},
    "label-smoothing": {"label_smoothing": 0.1, "ignore": True},
    "weight-smoothing": {"weight": True, "label_smoothing": 0.2, "ignore": True},
    "z-loss-weight-ignore": {"z_loss": 1e-2, "weight": True, "ignore": True},  # two different denominators
    "softcap": {"softcap": 2.0},
    "probs": {"probs": True},
    "probs-smoothing-weight": {"probs": True, "label_smoothing": 0.1, "weight": True},
    "everything-sum": {
        "weight": True,
        "ignore": True,
        "label_smoothing": 0.1,
        "z_loss": 1e-3,
        "softcap": 3.0,
        "reduction": "sum",
    },
}

#: name -> (mesh shape, logits placements, logits shape, class axis)
LAYOUTS = {
    "batch": ((2,), ("S0",), (5, 7), -1),  # uneven rows: 3 and 2
    "batch-middle-axis": ((2,), ("S1",), (2, 5, 7), -1),  # (B, T, V) split over T
    "classes": ((2,), ("S1",), (5, 7), -1),  # uneven classes: 4 and 3
    "classes-axis-1": ((2,), ("S1",), (3, 7, 2), 1),  # torch's (N, C, d) layout
    "2x1-batch-classes": ((2, 1), ("S0", "S1"), (6, 9), -1),
    "1x2-batch-classes": ((1, 2), ("S0", "S1"), (6, 9), -1),
}


def _placement(code: str) -> Any:
    from torch.distributed.tensor import Replicate, Shard

    return Replicate() if code == "R" else Shard(int(code[1:]))


def _data(shape: tuple[int, ...], axis: int, dtype: Any, probs: bool) -> tuple[Any, Any, Any]:
    """The full logits, target and weight (the same on every rank). Class-index targets hold
    ignored positions in both halves of every axis (2 in the first row block, 1 in the second)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    classes = shape[axis]
    weight = torch.rand(classes, generator=gen, dtype=torch.float64) + 0.5
    if probs:
        target = torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64), dim=axis)
        return x.to(dtype), target.to(dtype), weight.to(dtype)
    rows = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
    target = torch.randint(0, classes, rows, generator=gen).flatten()
    target[[0, 1, -1]] = IGNORE  # ranks hold different numbers of ignored targets
    return x.to(dtype), target.reshape(rows), weight.to(dtype)


def _close(got: Any, want: Any, rtol: float, what: str, failures: list[str]) -> None:
    import torch

    got = got.full_tensor() if hasattr(got, "full_tensor") else got
    scale = want.detach().double().abs().max().item() if want.numel() else 1.0  # atol: rtol at the largest entry
    if got.shape != want.shape or not torch.allclose(got.double(), want.double(), rtol=rtol, atol=rtol * scale):
        err = (got.double() - want.double()).abs().max().item() if got.shape == want.shape else "shape"
        head = f"got {got.flatten()[:4]}, want {want.flatten()[:4]}"
        failures.append(f"{what}: max |error| {err} (rtol {rtol:g}); {head}")


def _check_layout(rank: int, world_size: int, layout: str, dtype_name: str) -> list[str]:
    """Every option on one layout, against the unsharded call on the full data; the failures."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    import multixent as mx

    mesh_shape, codes, shape, axis = LAYOUTS[layout]
    mesh = init_device_mesh("cpu", mesh_shape)
    placements = [_placement(c) for c in codes]
    dtype = getattr(torch, dtype_name)
    eps = torch.finfo(dtype).eps
    # float32: summation orders differ (per-shard sums all-reduced); bfloat16: computed in float32,
    # so the sharded and unsharded results differ by the final rounding (an ulp or two)
    rtol = 1e-12 if dtype == torch.float64 else 50 * eps if dtype == torch.float32 else 2 * eps
    class_axis = axis % len(shape)
    # the group= path does not differentiate a weight (NotImplementedError): checked without then
    class_split = any(c == f"S{class_axis}" and n > 1 for c, n in zip(codes, mesh_shape, strict=True))
    failures: list[str] = []

    def dt(a: Any, places: list[Any]) -> Any:
        return distribute_tensor(a, mesh, places, src_data_rank=None)

    def target_placements(probs: bool) -> list[Any]:
        out = []
        for p in placements:
            if isinstance(p, Shard) and p.dim % len(shape) == class_axis:
                out.append(p if probs else Replicate())
            elif isinstance(p, Shard) and not probs and p.dim % len(shape) > class_axis:
                out.append(Shard(p.dim % len(shape) - 1))
            else:
                out.append(p)
        return out

    for name, spec in OPTIONS.items():
        spec = dict(spec)
        probs, use_weight, ignore = spec.pop("probs", False), spec.pop("weight", False), spec.pop("ignore", False)
        x, target, weight = _data(shape, axis, dtype, probs)
        if not probs and not ignore:
            target = torch.where(target == IGNORE, 0, target)
        kwargs = {"axis": axis, **spec}
        reduction = spec.get("reduction", "mean")
        # the unsharded reference, on the full data
        x_ref = x.clone().requires_grad_()
        grad_weight = use_weight and not class_split
        w_ref = weight.clone().requires_grad_(grad_weight) if use_weight else None
        want = mx.cross_entropy(x_ref, target, weight=w_ref, **kwargs)
        cot = torch.rand(want.shape, generator=torch.Generator().manual_seed(1), dtype=dtype) + 0.5
        want_grads = torch.autograd.grad(want, [x_ref, *([w_ref] if grad_weight else [])], cot)
        # sharded: a target of either kind, the weight a replicated DTensor
        x_dt = dt(x, placements).requires_grad_()
        t_dt = dt(target, target_placements(probs))
        w_dt = dt(weight, [Replicate()] * mesh.ndim).requires_grad_(grad_weight) if use_weight else None
        got = mx.cross_entropy(x_dt, t_dt, weight=w_dt, **kwargs)
        if not isinstance(got, DTensor):
            failures.append(f"{name}: result is a {type(got).__name__}, not a DTensor")
            continue
        _close(got, want, rtol, f"{name}: value", failures)
        if reduction != "none" and any(not isinstance(p, Replicate) for p in got.placements):
            failures.append(f"{name}: scalar placements {got.placements}")
        cot_dt = dt(cot, [*got.placements])  # the cotangent, placed like the result
        torch.autograd.backward(got, cot_dt)
        if tuple(x_dt.grad.placements) != tuple(placements):
            failures.append(f"{name}: gradient placements {x_dt.grad.placements}, logits {placements}")
        _close(x_dt.grad, want_grads[0], rtol, f"{name}: d/d logits", failures)
        if grad_weight:
            _close(w_dt.grad, want_grads[1], rtol, f"{name}: d/d weight", failures)
        if reduction != "none":  # cross_entropy_and_grad: the same value and the gradient of cot·loss
            loss, grad = mx.cross_entropy_and_grad(x_dt.detach(), t_dt, weight=weight if use_weight else None, **kwargs)
            _close(loss, want, rtol, f"{name}: cross_entropy_and_grad value", failures)
            _close(grad * cot, want_grads[0], rtol, f"{name}: cross_entropy_and_grad gradient", failures)
            if tuple(grad.placements) != tuple(placements):
                failures.append(f"{name}: cross_entropy_and_grad gradient placements {grad.placements}")

    # log_softmax, logsumexp (keepdims or not), nll_loss of log_softmax
    x, target, weight = _data(shape, axis, dtype, False)
    x_dt = dt(x, placements)
    t_dt = dt(target, target_placements(False))
    got = mx.log_softmax(x_dt, axis=axis)
    _close(got, mx.log_softmax(x, axis=axis), rtol, "log_softmax", failures)
    if tuple(got.placements) != tuple(placements):
        failures.append(f"log_softmax placements {got.placements}")
    for keepdims in (False, True):
        _close(
            mx.logsumexp(x_dt, axis=axis, keepdims=keepdims),
            mx.logsumexp(x, axis=axis, keepdims=keepdims),
            rtol,
            f"logsumexp keepdims={keepdims}",
            failures,
        )
    for reduction in ("mean", "none"):
        want = mx.nll_loss(mx.log_softmax(x, axis=axis), target, axis=axis, weight=weight, reduction=reduction)
        got = mx.nll_loss(mx.log_softmax(x_dt, axis=axis), t_dt, axis=axis, weight=weight, reduction=reduction)
        _close(got, want, rtol, f"nll_loss {reduction}", failures)
    return failures


CASES = [(layout, dtype) for layout in LAYOUTS for dtype in ("float64", "float32")]
CASES += [("batch", "bfloat16"), ("classes", "bfloat16")]


@pytest.mark.parametrize(("layout", "dtype"), CASES)
def test_dtensor_equals_the_unsharded_call(layout: str, dtype: str) -> None:
    failures = run_ranks(_check_layout, 2, args=(layout, dtype))
    assert failures == [[], []]


def _errors(rank: int, world_size: int) -> list[str]:
    """Each bad call raises on this rank (the harness fails the test if any rank hangs instead)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    import multixent as mx

    mesh = init_device_mesh("cpu", (2,))
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1, 2, 3])
    seen = []
    cases = {
        "partial logits": (
            lambda: mx.cross_entropy(DTensor.from_local(x, mesh, [Partial()]), target),
            ValueError,
            r"placements \(Partial\(sum\),\); expected Shard\(class axis\)",
        ),
        "class-sharded index target": (
            lambda: mx.cross_entropy(
                distribute_tensor(x, mesh, [Shard(1)], src_data_rank=None),
                distribute_tensor(target, mesh, [Shard(0)], src_data_rank=None),
            ),
            ValueError,
            r"target has placements \(Shard\(dim=0\),\); expected \(Replicate\(\),\) for class indices",
        ),
        # rank 1's half holds the bad index: raised on both ranks
        "out of range on rank 1": (
            lambda: mx.cross_entropy(
                distribute_tensor(x, mesh, [Shard(0)], src_data_rank=None),
                distribute_tensor(torch.tensor([0, 1, 2, 6]), mesh, [Shard(0)], src_data_rank=None),
            ),
            IndexError,
            r"6.*\b6\b" if rank == 1 else r"6.*raised on rank 1",
        ),
        # the class-sharded path: a replicated target out of range, checked against the global C
        "out of range, class-sharded": (
            lambda: mx.cross_entropy(
                distribute_tensor(x, mesh, [Shard(1)], src_data_rank=None), torch.tensor([0, 6, 2, 3])
            ),
            IndexError,
            r"\b6\b",
        ),
        "two mesh dimensions on the class axis": (
            lambda: mx.cross_entropy(
                distribute_tensor(x, init_device_mesh("cpu", (2, 1)), [Shard(1), Shard(1)], src_data_rank=None),
                target,
            ),
            ValueError,
            r"Shard\(class axis\) on at most one mesh dimension",
        ),
        "group= with a DTensor": (
            lambda: mx.log_softmax(
                distribute_tensor(x, mesh, [Shard(1)], src_data_rank=None), group=torch.distributed.group.WORLD
            ),
            ValueError,
            r"group= is for local tensors",
        ),
        "a DTensor target with plain logits": (
            lambda: mx.cross_entropy(x, distribute_tensor(target, mesh, [Shard(0)], src_data_rank=None)),
            TypeError,
            r"target or weight is a DTensor but logits is a Tensor; expected a DTensor",
        ),
        "linear_cross_entropy": (
            lambda: mx.linear_cross_entropy(
                distribute_tensor(x, mesh, [Shard(0)], src_data_rank=None), torch.randn(5, 6), target
            ),
            TypeError,
            r"linear_cross_entropy does not take DTensor inputs",
        ),
    }
    import re

    for name, (call, kind, pattern) in cases.items():
        try:
            call()
        except kind as e:
            if not re.search(pattern, str(e)):
                seen.append(f"{name}: {type(e).__name__}: {e} does not match {pattern!r}")
        else:
            seen.append(f"{name}: nothing raised")
    return seen


def test_errors_are_raised_on_every_rank() -> None:
    assert run_ranks(_errors, 2, timeout=120) == [[], []]
