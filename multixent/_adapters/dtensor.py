"""torch DTensor inputs: unwrapped to their local shards at the entry, results wrapped back.

Imported only when a ``torch.distributed.tensor.DTensor`` arrives. The logits may be sharded
on the class axis (``Shard(axis)``: the class axis split over that mesh dimension's group, the
``group=`` path) and on any other axis (``Shard(d)``: the batch, data parallelism), on a mesh
of any number of dimensions; every other mesh dimension ``Replicate()``. At most one mesh
dimension may shard the class axis, and shards may be uneven (torch's ``torch.chunk`` sizes:
each rank's class offset comes from the DTensor's layout).

- ``target``: a DTensor on the same mesh, or a plain tensor holding the whole (global)
  target. Class indices are replicated over the class-sharding mesh dimension and sharded
  like the logits' batch axes (``Replicate()`` there is sliced locally, no communication);
  probabilities are sharded exactly like the logits.
- ``weight``: the full ``(C,)``, a plain tensor or a DTensor of any placement (gathered whole);
  its gradient is the whole one (every rank's rows), on every rank.
- Results are DTensors: per-row results (``reduction="none"``, ``logsumexp``) sharded like
  the logits' batch axes and replicated over the class groups; "mean"/"sum" ``Replicate()``;
  ``log_softmax`` and gradients sharded exactly like the logits.
- Batch-sharded "mean" is the global mean: the sums and the denominators are all-reduced
  over the batch-sharding mesh dimensions (differentiably: every rank holds the same total,
  so its backward passes the gradient through unchanged), whatever the number of ignored
  targets on each rank.
- Errors: everything checked before the first collective depends on the global shapes and
  placements (the same on every rank), except the class indices' range: that check is
  agreed over the mesh with one small all-reduce, so an index out of range on one rank raises
  the same ``IndexError`` on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .torch import GroupSpread, GroupSum, held_weakly  # the group= path's differentiable all-reduces


@dataclass(frozen=True)
class Layout:
    """How one call's logits lie on the mesh, as seen from this rank."""

    mesh: Any  # DeviceMesh
    shape: tuple[int, ...]  # the logits' global shape
    axis: int  # the class axis
    class_dim: int | None  # the mesh dimension sharding the class axis
    batch: tuple[tuple[int, int], ...]  # (mesh dimension, logits axis) for each other sharded axis
    offset: int  # this rank's first class

    @property
    def class_group(self) -> Any:
        """The process group the class axis is split over (None: not split, or over 1 rank)."""
        if self.class_dim is None or self.mesh.size(self.class_dim) == 1:
            return None
        return self.mesh.get_group(self.class_dim)

    @property
    def class_offset(self) -> int | None:
        """This rank's first class, with :attr:`class_group` (uneven shards: ``torch.chunk``'s sizes)."""
        return None if self.class_group is None else self.offset

    def wrap(self, out: torch.Tensor, rows_only: bool) -> DTensor:
        """``out`` (this rank's result) as a DTensor: a scalar, logits-shaped (not ``rows_only``),
        or per row (``rows_only``; with the class axis kept as size 1 if ``out`` has it)."""
        if out.ndim == 0:
            return DTensor.from_local(out, self.mesh, [Replicate()] * self.mesh.ndim, run_check=False)
        ndim = len(self.shape)
        dims = [d for d in range(ndim) if out.ndim == ndim or d != self.axis]
        placements: list[Any] = [Replicate()] * self.mesh.ndim
        for mesh_dim, d in self.batch:
            placements[mesh_dim] = Shard(dims.index(d))
        if not rows_only and self.class_dim is not None:
            placements[self.class_dim] = Shard(self.axis)
        shape = torch.Size(1 if rows_only and d == self.axis else self.shape[d] for d in dims)
        return DTensor.from_local(out, self.mesh, placements, run_check=False, shape=shape, stride=_strides(shape))

    def sum_batch(self, a: Any, dtype: torch.dtype) -> Any:
        """``a`` (a scalar tensor or int) summed over the batch-sharding mesh dimensions; the
        gradient passes through unchanged (the total is the same on every rank)."""
        if not self.batch:
            return a
        if not isinstance(a, torch.Tensor):
            a = torch.tensor(a, dtype=dtype, device=self.mesh.device_type)
        for group in self.batch_groups:
            a = GroupSum.apply(a, group)  # type: ignore[no-untyped-call]
        return a

    @property
    def batch_groups(self) -> list[Any]:
        """The process groups of the batch-sharding mesh dimensions."""
        return [self.mesh.get_group(m) for m, _ in self.batch]

    def agree(self, check: Callable[[], Any]) -> Any:
        """``check()`` where its data differ between ranks (a batch-sharded target): an error
        on one rank is raised on every rank (one all-reduce of a flag; the messages only then)."""
        if not self.batch:
            return check()
        error: Exception | None = None
        result = None
        try:
            result = check()
        except (IndexError, ValueError, TypeError) as e:
            error = e
        groups = self.batch_groups  # the target differs only along these
        flag = torch.tensor([error is not None], dtype=torch.int64)
        for group in groups:
            dist.all_reduce(flag, group=group)
        if not flag.item():
            return result
        first: Any = None if error is None else (dist.get_rank(), type(error), str(error))
        for group in groups:
            gathered: list[Any] = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, first, group=group)
            first = next((e for e in gathered if e is not None), None)  # known after the last group
        if error is not None:
            raise error
        rank, kind, message = first
        raise kind(f"{message} (raised on rank {rank})")


def _strides(shape: torch.Size) -> tuple[int, ...]:
    return tuple(math.prod(shape[d + 1 :]) for d in range(len(shape)))


def _placement_error(what: str, got: Any, expected: str) -> ValueError:
    return ValueError(f"multixent: DTensor {what} has placements {tuple(got)}; expected {expected}")


_LOGITS_EXPECTED = (
    "Shard(class axis) on at most one mesh dimension, Shard(other axis) or Replicate() on the others (no Partial)"
)


def layout(x: DTensor, axis: int, name: str) -> Layout:
    """The logits' layout, or a ValueError naming the placements expected (the same on every rank)."""
    sharded = [(m, p.dim % x.ndim) for m, p in enumerate(x.placements) if isinstance(p, Shard)]  # (mesh dim, axis)
    class_dims = [m for m, d in sharded if d == axis]
    batch = [(m, d) for m, d in sharded if d != axis]
    handled = all(type(p) in (Shard, Replicate) for p in x.placements)
    if not handled or len(class_dims) > 1 or len({d for _, d in batch}) < len(batch):
        raise _placement_error(name, x.placements, _LOGITS_EXPECTED)
    offsets = compute_local_shape_and_global_offset(x.shape, x.device_mesh, x.placements)[1]
    class_dim = class_dims[0] if class_dims else None
    return Layout(x.device_mesh, tuple(x.shape), axis, class_dim, tuple(batch), int(offsets[axis]))


def local_target(target: Any, lay: Layout, is_index: bool) -> torch.Tensor:
    """This rank's part of ``target``: sharded like the logits' batch axes (and, for
    probabilities, their class axis); a plain tensor is the global target."""
    wanted = _target_placements(lay, is_index)
    if not isinstance(target, DTensor):
        target = DTensor.from_local(target, lay.mesh, [Replicate()] * lay.mesh.ndim, run_check=False)
    elif target.device_mesh != lay.mesh:
        raise ValueError(f"multixent: DTensor target is on mesh {target.device_mesh}; expected the logits' {lay.mesh}")
    if not _sliced_locally(target, wanted):
        kind = "class indices" if is_index else "probabilities"
        expected = (
            f"{tuple(wanted)} for {kind} with {len(lay.shape)}-d logits, class axis {lay.axis} "
            "(or Replicate() anywhere)"
        )
        raise _placement_error("target", target.placements, expected)
    local: torch.Tensor = target.redistribute(lay.mesh, wanted).to_local()
    return local


def _target_placements(lay: Layout, is_index: bool) -> list[Any]:
    """The target's placements beside logits of layout ``lay``: sharded like their batch axes (class indices
    have no class axis: the axes after it come one earlier) and, for probabilities, like their class axis."""
    wanted: list[Any] = [Replicate()] * lay.mesh.ndim
    for mesh_dim, d in lay.batch:
        wanted[mesh_dim] = Shard(d if not is_index or d < lay.axis else d - 1)
    if not is_index and lay.class_dim is not None:
        wanted[lay.class_dim] = Shard(lay.axis)
    return wanted


def _sliced_locally(target: DTensor, wanted: list[Any]) -> bool:
    """Whether ``target`` reaches the placements ``wanted`` without moving data: each of its placements is
    that one, or a Replicate() (where a Shard() is wanted: a local slice)."""
    ndim = target.ndim
    return all(
        type(p) is Replicate or (isinstance(p, Shard) and isinstance(w, Shard) and p.dim % ndim == w.dim)
        for p, w in zip(target.placements, wanted, strict=True)
    )


def local_weight(weight: Any, lay: Layout) -> Any:
    """The full ``(C,)`` class weights (gathered if a DTensor), whose gradient is the sum of the
    ranks' contributions over the batch-sharding mesh dimensions: ``weight``'s whole gradient."""
    if weight is None:
        return None
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
    for group in lay.batch_groups:
        weight = GroupSpread.apply(weight, held_weakly(group))  # type: ignore[no-untyped-call]
    return weight


def unwrap(
    x: Any, target: Any, weight: Any, axis: int, is_index: bool, name: str, group: Any
) -> tuple[Any, Any, Any, Layout]:
    """``(local logits, local target, full weight, layout)`` of a DTensor call."""
    _no_group(group)
    if not isinstance(x, DTensor):
        kind = type(x).__name__
        raise TypeError(f"multixent: target or weight is a DTensor but {name} is a {kind}; expected a DTensor")
    lay = layout(x, axis, name)
    return x.to_local(), local_target(target, lay, is_index), local_weight(weight, lay), lay


def unwrap_one(x: Any, axis: int, name: str, group: Any) -> tuple[Any, Layout]:
    """``(local x, layout)`` (``logsumexp``, ``log_softmax``)."""
    _no_group(group)
    return x.to_local(), layout(x, axis, name)


def _no_group(group: Any) -> None:
    if group is not None:
        raise ValueError(
            "multixent: group= is for local tensors; a DTensor's class axis is split over the mesh dimension "
            "its Shard(class axis) placement names"
        )


def refuse(function: str) -> None:
    """The error for DTensors where ``function`` does not take them."""
    raise TypeError(
        f"multixent: {function} does not take DTensor inputs; pass the local tensors (to_local()) and group="
    )
