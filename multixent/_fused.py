"""The formulas run fused: each pass one out-of-place expression over the rows.

For compilers (XLA, Inductor), transforms (torch.func, vmap, JAX's), lazy arrays (dask),
array-api-strict, and accelerators: nothing is written in place, and the loss's forward reads
the logits once (the max) and then computes ``exp(s)`` once, from which the gradient follows.
Chosen by the adapters through their plan (``Plan.in_place`` False); see :mod:`multixent._formulas`
for what each step computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import array_api_extra as xpx

from . import _formulas as F
from ._compat import device, row_max, row_sum, subtract_at_rows_copy

Array = Any
Namespace = Any


@dataclass
class Forward:
    """Forward quantities of some rows, kept for their gradient."""

    ce: Array  # (n,)
    lse: Array | None  # (n,), 0 on ignored rows (None: not asked for)
    s: Array | None  # (n, C) logits minus their finite row max (None: overwritten by e)
    shift: Array  # (n, 1) the finite row max m, s = z - m
    sum_e: Array  # (n,) Σ exp(s), lse_s = log(sum_e)
    lse_s: Array  # (n,) log Σ exp(s)
    e: Array  # (n, C) exp(s)
    tanh: Array | None  # tanh(x/softcap), or None
    targets: Any  # ClassTargets, or the (n, C) smoothed weighted probabilities t'·w


def targets_of(
    x: Array, target: Array, weight: Array | None, opts: F.Options, plan: Any, dtype: Any, xp: Namespace
) -> Any:
    """:func:`multixent._formulas.class_targets` for ``(rows,)`` class indices; the smoothed, weighted
    probabilities ``t'·w`` (the member's classes) for ``(rows, C)`` ones."""
    shard, num_local = plan.shard, x.shape[-1]
    num_classes = F.num_classes(num_local, shard)
    if target.ndim == 1:
        return F.class_targets(
            target,
            weight,
            num_classes,
            opts,
            xp,
            may_ignore=plan.may_ignore,
            shard=shard,
            num_local=num_local,
            assert_none=plan.assert_none,
        )
    return F.smoothed(xp.astype(target, dtype), num_classes, opts, F.local_weight(weight, shard, x, xp))


def shift(top: Array, plan: Any, xp: Namespace) -> Array:
    """The shift ``m`` from the member's row max ``top``: the group's max, made finite
    (:func:`multixent._formulas.finite_shift`), not differentiated (``plan.stop_gradient``: its
    derivative cancels exactly)."""
    if plan.stop_gradient is not None:
        top = plan.stop_gradient(top)
    return F.finite_shift(F.group_max(top, plan.shard), xp)


def forward(
    x: Array,
    target: Array,
    weight: Array | None,
    opts: F.Options,
    plan: Any,
    dtype: Any,
    xp: Namespace,
    *,
    for_grad: bool,
    need_lse: bool = True,
) -> Forward:
    """The loss of some rows, out of place: ``z``, ``m``, ``s = z - m``, ``e = exp(s)``, the row sums, ``ce``.

    ``for_grad`` zeroes the ignored rows' logits first, so that their NaN or inf never reaches a
    gradient (a plan that is in place zeroes those rows of the gradient instead). A value-only
    forward masks the per-row results: on the CPU, XLA cannot fuse a ``where`` over the logits
    into its reductions and would materialise it.
    """
    targets = targets_of(x, target, weight, opts, plan, dtype, xp)
    is_index = isinstance(targets, F.ClassTargets)
    counted = targets.counted if is_index and for_grad and not plan.in_place else None
    z, th = F.prepare_logits(x, counted, opts, dtype, xp)
    # the preparation is monotonic: max(z) = prepare(max(x)), and XLA need not materialise z
    m = shift(F.prepare_logits(row_max(x, xp), counted, opts, dtype, xp)[0], plan, xp)
    if not is_index:
        s = z - m
        tws = F.weighted_target_sum(targets, s, xp)
        e = xp.exp(s)
        sum_e, tws, tw_sum = F.group_sums(plan.shard, xp, row_sum(e, xp), tws, row_sum(targets, xp))
        lse_s = xp.log(sum_e)
        lse = lse_s + m[:, 0] if need_lse else None
        return Forward(F.probability_loss(lse_s, tw_sum, tws), lse, s, m, sum_e, lse_s, e, th, targets)
    # the target's logit gathered from the input (XLA materialises a gather's operand)
    picked = F.gather_rows(x, targets.index, xp, one_hot=plan.one_hot_target)
    z_y = F.prepare_logits(picked[:, None], counted, opts, dtype, xp)[0][:, 0]
    s = z - m
    if targets.here is not None:  # the target's term: from the one shard holding it
        z_y = xp.where(targets.here, z_y, 0.0)
    smooth_sum, w_sum = _smoothing_sum(x, z, counted, weight, opts, plan, dtype, xp)
    e = xp.exp(s)
    sum_e, z_y, smooth_sum = F.group_sums(plan.shard, xp, row_sum(e, xp), z_y, smooth_sum)
    if smooth_sum is not None:  # Σ w_c s_c = Σ w_c z_c - m Σ w_c
        smooth_sum = smooth_sum - m[:, 0] * w_sum
    num_classes = F.num_classes(x.shape[-1], plan.shard)
    ce, lse, lse_s = F.index_rows(sum_e, z_y - m[:, 0], smooth_sum, m, targets, opts, num_classes, w_sum, xp, need_lse)
    return Forward(ce, lse, s, m, sum_e, lse_s, e, th, targets)


def _smoothing_sum(
    x: Array,
    z: Array,
    counted: Array | None,
    weight: Array | None,
    opts: F.Options,
    plan: Any,
    dtype: Any,
    xp: Namespace,
) -> tuple[Array | None, Array | int | None]:
    """``(Σ_c w_c z_c, Σ_c w_c)`` of the member's classes for the smoothing term (None without smoothing).

    From ``z``, not ``s``, so that a compiler (XLA) need not keep ``s`` for a second reduction; with
    ignored rows and no softcap, from the unmasked logits, masked per row: XLA would keep the masked
    logits for a second reduction (the gradient's); an ignored row's cotangent is 0, so ``w_c · 0``
    reaches its logits.
    """
    if not F.may_be_nonzero(opts.label_smoothing):
        return None, None
    w_local = F.local_weight(weight, plan.shard, x, xp)
    w_sum = F.weight_sum(weight, F.num_classes(x.shape[-1], plan.shard), xp)
    if counted is not None and opts.softcap is None:
        unmasked = F.prepare_logits(x, None, opts, dtype, xp)[0]
        return xp.where(counted, F.row_sum_weighted(unmasked, w_local, xp), 0.0), w_sum
    return F.row_sum_weighted(z, w_local, xp), w_sum


def from_stats(
    x: Array, target: Array, weight: Array | None, stats: tuple[Array, Array], opts: F.Options, plan: Any, xp: Namespace
) -> tuple[Array, Array, Array | None, Any]:
    """``(e, sum_e, tanh, targets)`` of some rows from the forward's per-row ``(m, lse_s)``:
    ``e = exp(z - m)`` and ``softmax = e / sum_e`` with ``sum_e = exp(lse_s)`` (``exp(z - lse)``
    would lose float32's precision at large logits)."""
    dtype = F.compute_dtype(x.dtype, xp)
    targets = targets_of(x, target, weight, opts, plan, dtype, xp)
    counted = targets.counted if isinstance(targets, F.ClassTargets) else None
    z, th = F.prepare_logits(x, counted, opts, dtype, xp)
    m, lse_s = stats
    return xp.exp(z - m[:, None]), xp.exp(lse_s), th, targets


def gradient(
    e: Array,
    sum_e: Array,
    th: Array | None,
    targets: Any,
    weight: Array | None,
    ce_bar: Array,
    lse_bar: Array | None,
    opts: F.Options,
    xp: Namespace,
    shard: F.Shard | None = None,
) -> Array:
    """``ce_bar·∂ce/∂z + lse_bar·∂lse/∂z = (e·r - d)`` less ``a`` at the target
    (:func:`multixent._formulas.grad_terms`), times ``1 - tanh²`` under a softcap."""
    r, d, a = F.grad_terms(sum_e, targets, weight, ce_bar, lse_bar, opts, xp, e, shard)
    g = e * r[:, None]
    if d is not None:
        g = g - d
    if a is not None and g.shape[-1]:  # (no class here: no target either)
        g = subtract_at_rows_copy(g, targets.index, a, xp)
    return g if th is None else g * F.softcap_factor(th, xp)


class Output:
    """The ``(rows, C)`` gradient of blocks of rows, out of place: each block's gradient is set into
    the result (one block: it is the result). The methods of :class:`multixent._blocked.Output` that
    say where a block is written answer None: anywhere."""

    def __init__(
        self, like: Array, dtype: Any, spans: list[tuple[int, int]], xp: Namespace, *, scratch: bool, overwrite: bool
    ):
        self.xp, self.dtype = xp, like.dtype
        self.array = None if len(spans) == 1 else xp.empty(like.shape, dtype=like.dtype, device=device(like))

    def scratch(self, a: int, b: int) -> None:
        return None

    def tanh_scratch(self, rows: int, opts: F.Options) -> None:
        return None

    def dest(self, a: int, b: int) -> None:
        return None

    def put(self, a: int, b: int, g: Array) -> Array:
        """Store block ``[a, b)``; returns the output so far."""
        g = self.xp.astype(g, self.dtype, copy=False)
        if self.array is None:
            return g
        self.array = xpx.at(self.array)[a:b, ...].set(g)
        return self.array
