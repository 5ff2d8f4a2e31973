"""One agreement before any collective: a ``group=`` (and DTensor) call on 2 gloo ranks whose inputs
differ between the ranks, or fail a check on one rank only, raises the same error (class and message)
on every rank: never a hang, never a rank aborted by gloo. Ranks holding no class take part.

Each case runs on both ranks (one spawn for all, with a timeout): before the agreement these cases
left one rank waiting in a collective (a hang) or made gloo abort a rank (a collective mismatch).
"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("torch")

from _ranks import ONLY_DISTRIBUTED, outcomes, run_ranks

pytestmark = ONLY_DISTRIBUTED

C = 12


def _cases(rank: int):
    """name -> a call made on both ranks (arguments that differ by rank where the case says so)."""
    import torch
    import torch.distributed as dist

    import multixent as mx

    world = dist.group.WORLD
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, C, generator=g, dtype=torch.float64)
    target = torch.tensor([0, 4, 5, 6, 7, 11, -100, 2, 10])
    weight = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    half = x[:, 6 * rank : 6 * rank + 6]
    one = rank == 1  # the rank whose argument differs
    h = torch.randn(9, 4, generator=g, dtype=torch.float64)
    w = torch.randn(C, 4, generator=g, dtype=torch.float64)[6 * rank : 6 * rank + 6]
    return {
        "ignore-index-differs": lambda: mx.cross_entropy(  # valid on each rank alone: silently different losses
            half, torch.where(target == -100, 1, target), group=world, ignore_index=4 if one else -100
        ),
        "weight-length-on-one-rank": lambda: mx.cross_entropy(
            half, target, group=world, weight=weight[:11] if one else weight
        ),
        "weight-2d-on-one-rank": lambda: mx.cross_entropy(
            half, target, group=world, weight=weight[None] if one else weight
        ),
        "label-smoothing-out-of-range-on-one-rank": lambda: mx.cross_entropy(
            half, target, group=world, label_smoothing=1.5 if one else 0.1
        ),
        "z-loss-negative-on-one-rank": lambda: mx.cross_entropy(half, target, group=world, z_loss=-1.0 if one else 0.0),
        "weight-requiring-grad-on-one-rank": lambda: mx.cross_entropy(
            half, target, group=world, weight=weight.clone().requires_grad_(one)
        ),
        "option-tensor-requiring-grad-on-one-rank": lambda: mx.cross_entropy(
            half, target, group=world, softcap=torch.tensor(3.0, dtype=torch.float64, requires_grad=one)
        ),
        "label-smoothing-differs": lambda: mx.cross_entropy(
            half, target, group=world, label_smoothing=0.2 if one else 0.1
        ),
        "reduction-differs": lambda: mx.cross_entropy(half, target, group=world, reduction="sum" if one else "mean"),
        "rows-differ-mean": lambda: mx.cross_entropy(half[: 9 - rank], target[: 9 - rank], group=world),
        "rows-differ-none": lambda: mx.cross_entropy(
            half[: 9 - rank], target[: 9 - rank], group=world, reduction="none"
        ),
        "rows-differ-logsumexp": lambda: mx.logsumexp(half[: 9 - rank], group=world),
        "rows-differ-and-grad": lambda: mx.cross_entropy_and_grad(half[: 9 - rank], target[: 9 - rank], group=world),
        "dtype-differs": lambda: mx.cross_entropy(half.float() if one else half, target, group=world),
        "functions-differ": lambda: (
            mx.logsumexp(half, group=world) if one else mx.cross_entropy(half, target, group=world)
        ),
        "linear-rows-differ": lambda: mx.linear_cross_entropy(h[: 9 - rank], w, target[: 9 - rank], group=world),
        "linear-chunk-size-differs": lambda: mx.linear_cross_entropy(
            h, w, target, group=world, chunk_size=3 if one else 4
        ),
        "linear-hidden-size-differs": lambda: mx.linear_cross_entropy(
            torch.randn(9, 4 + rank, dtype=torch.float64),
            torch.randn(6, 4 + rank, dtype=torch.float64),
            target,
            group=world,
        ),
        "linear-smoothing-out-of-range-on-one-rank": lambda: mx.linear_cross_entropy(
            h, w, target, group=world, label_smoothing=-0.5 if one else 0.0
        ),
        "target-out-of-range-on-one-rank": lambda: mx.cross_entropy(
            half, torch.where(target == 2, C if one else 2, target), group=world
        ),
        "ok-after-the-errors": lambda: mx.cross_entropy(half, target, group=world),
    }


#: case -> "Type: regex" expected on every rank (the same message on both)
EXPECTED = {
    "ignore-index-differs": r"ValueError: .*disagree on ignore_index: \[-100, 4\] by rank",
    "weight-length-on-one-rank": r"ValueError: .*disagree on weight length: \[12, 11\] by rank",
    "weight-2d-on-one-rank": r"ValueError: .*weight must have shape \(C,\).*got \(1, 12\).*\[raised on rank 1 ",
    "label-smoothing-out-of-range-on-one-rank": r"ValueError: .*label_smoothing.*1\.5.*\[raised on rank 1 ",
    "z-loss-negative-on-one-rank": r"ValueError: .*z_loss.*-1.*\[raised on rank 1 ",
    "weight-requiring-grad-on-one-rank": r"NotImplementedError: .*class weights that require grad.*\[raised on rank 1 ",
    "option-tensor-requiring-grad-on-one-rank": r"NotImplementedError: .*softcap as a tensor.*\[raised on rank 1 ",
    "label-smoothing-differs": r"ValueError: .*disagree on label_smoothing: \[0\.1, 0\.2\] by rank",
    "reduction-differs": r"ValueError: .*disagree on reduction: \['mean', 'sum'\] by rank",
    "rows-differ-mean": r"ValueError: .*disagree on rows: \[9, 8\] by rank",
    "rows-differ-none": r"ValueError: .*disagree on rows: \[9, 8\] by rank",
    "rows-differ-logsumexp": r"ValueError: .*disagree on rows: \[9, 8\] by rank",
    "rows-differ-and-grad": r"ValueError: .*disagree on rows: \[9, 8\] by rank",
    "dtype-differs": r"ValueError: .*disagree on logits dtype: \['float64', 'float32'\] by rank",
    "functions-differ": r"ValueError: .*disagree on function: \['cross_en', 'logsumex'\] by rank",
    "linear-rows-differ": r"ValueError: .*disagree on rows: \[9, 8\] by rank",
    "linear-chunk-size-differs": r"ValueError: .*disagree on chunk_size: \[4, 3\] by rank",
    "linear-hidden-size-differs": r"ValueError: .*disagree on hidden size: \[4, 5\] by rank",
    "linear-smoothing-out-of-range-on-one-rank": r"ValueError: .*label_smoothing.*\[raised on rank 1 ",
    "target-out-of-range-on-one-rank": r"IndexError: .*class index 12 .*\[raised on rank 1 ",
    "ok-after-the-errors": "none",
}


def _errors(rank: int, world_size: int) -> dict[str, str]:
    return outcomes(_cases(rank))


@pytest.fixture(scope="module")
def errors() -> list[dict[str, str]]:
    return run_ranks(_errors, 2, timeout=300)


@pytest.mark.parametrize("case", list(EXPECTED))
def test_the_same_error_on_every_rank(errors, case):
    """Never a hang nor an aborted rank: both ranks raise the same error, which names the difference."""
    assert errors[0][case] == errors[1][case], (errors[0][case], errors[1][case])
    assert re.match(EXPECTED[case], errors[0][case], re.S), errors[0][case]


def _no_classes_here(rank: int, world_size: int) -> dict[str, float]:
    """Rank 1 holds no class (uneven shards 12 + 0): every function equals the unsharded call."""
    import torch
    import torch.distributed as dist

    import multixent as mx

    world = dist.group.WORLD
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, C, generator=g, dtype=torch.float64)
    target = torch.tensor([0, 4, 5, 6, 7, 11, -100, 2, 10])
    weight = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    part = slice(0, C) if rank == 0 else slice(C, C)
    offset = 0 if rank == 0 else C
    shard_kw = {"group": world, "class_offset": offset}
    out = {}

    def dev(a, e):
        return float((a.detach() - e.detach()).abs().max()) if a.numel() else 0.0

    for name, kw in {
        "plain": {},
        "options": {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0, "weight": weight},
        "none": {"reduction": "none", "label_smoothing": 0.2},
    }.items():
        mine, full = x[:, part].clone().requires_grad_(), x.clone().requires_grad_()
        loss, expected = mx.cross_entropy(mine, target, **kw, **shard_kw), mx.cross_entropy(full, target, **kw)
        loss.sum().backward()
        expected.sum().backward()
        out[f"{name}-value"] = dev(loss, expected)
        out[f"{name}-grad"] = dev(mine.grad, full.grad[:, part])
    out["logsumexp"] = dev(mx.logsumexp(x[:, part], **shard_kw), torch.logsumexp(x, -1))
    out["log_softmax"] = dev(mx.log_softmax(x[:, part], **shard_kw), torch.log_softmax(x, -1)[:, part])
    h = torch.randn(9, 4, generator=g, dtype=torch.float64)
    w = torch.randn(C, 4, generator=g, dtype=torch.float64)
    out["linear"] = dev(mx.linear_cross_entropy(h, w[part], target, **shard_kw), mx.linear_cross_entropy(h, w, target))
    return out


def test_a_rank_holding_no_class_takes_part():
    """Valid input: logsumexp, log_softmax, cross_entropy (values and gradients) and linear_cross_entropy
    with one rank's shard empty equal the unsharded call (the empty rank joins every collective)."""
    for rank, deviations in enumerate(run_ranks(_no_classes_here, 2, timeout=300)):
        for name, deviation in deviations.items():
            assert deviation < 1e-12, (rank, name, deviation)


def _dtensor_one_class(rank: int, world_size: int) -> dict[str, float]:
    """DTensor logits of C=1 sharded on the class axis over 2 ranks (rank 1's shard is empty)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import multixent as mx

    mesh = init_device_mesh("cpu", (2,))
    x = torch.randn(5, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    target = torch.zeros(5, dtype=torch.long)
    xd = distribute_tensor(x, mesh, [Shard(1)], src_data_rank=None).requires_grad_()
    full = x.clone().requires_grad_()
    loss, expected = (
        mx.cross_entropy(xd, target, label_smoothing=0.1),
        mx.cross_entropy(full, target, label_smoothing=0.1),
    )
    loss.full_tensor().backward()
    expected.backward()
    lse = mx.logsumexp(xd).full_tensor()
    return {
        "value": float((loss.full_tensor() - expected).abs()),
        "grad": float((xd.grad.full_tensor() - full.grad).abs().max()),
        "logsumexp": float((lse - torch.logsumexp(x, -1)).abs().max()),
    }


def test_dtensor_with_fewer_classes_than_ranks():
    for rank, deviations in enumerate(run_ranks(_dtensor_one_class, 2, timeout=300)):
        for name, deviation in deviations.items():
            assert deviation < 1e-12, (rank, name, deviation)
