"""The cross-entropy of 2-D ``(rows, C)`` logits, row by row: forward, gradient, tangents.

The adapters call these with a :class:`Plan`, which says how the formulas of
:mod:`multixent._formulas` run: fused (:mod:`multixent._fused`, out of place) or over blocks of
rows in place (:mod:`multixent._blocked`). The functions here only walk the blocks and put the
results together; per-row ``(ce, lse)`` come out in the compute dtype, reductions live in
:mod:`multixent._api`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import array_api_extra as xpx

from . import _blocked, _fused
from . import _formulas as F
from ._blocked import blocks, rows_of
from ._compat import device, full_like, known_size

Array = Any
Namespace = Any


@dataclass(frozen=True)
class Plan:
    """How one call is executed: chosen by the adapter (its ``plan``), never by the user."""

    #: Rows per block (None: one block). Eager CPU backends block for the cache
    #: (:data:`multixent._blocked.BLOCK_ELEMENTS`).
    block_rows: int | None = None
    #: True when arrays may be written in place and the namespace's functions take ``out=``
    #: (NumPy, eager torch; never while autodiff records): :mod:`multixent._blocked`. False:
    #: :mod:`multixent._fused`.
    in_place: bool = False
    #: False when the caller has seen the class indices (concrete values): none
    #: is ignore_index and all are in range. Saves a pass over the logits that
    #: zeroes the ignored rows, and the per-row masks.
    may_ignore: bool = True
    #: The framework's stop-gradient (None without autodiff), applied to the
    #: shift by the row max, whose derivative cancels exactly.
    stop_gradient: Callable[[Array], Array] | None = None
    #: The class axis split over a group (None: all classes here).
    shard: F.Shard | None = None
    #: In place: the adapter's ``exp`` over its argument where the namespace's is slower on its
    #: hardware (None: ``xp.exp(s, out=s)``).
    exp_into: Callable[[Array], Array] | None = None
    #: Out of place: the target's logit picked by a one-hot select, not a gather (whose derivative,
    #: a scatter, a compiler may get wrong where the framework differentiates the math itself).
    one_hot_target: bool = False
    #: The adapter's device-side assertion that a boolean ``(rows,)`` array holds no True (eager
    #: accelerators: no host read), given the rows whose class index is out of range, with the message;
    #: answers whether it asserted (not for an array it cannot read now). None: such rows' loss is NaN.
    assert_none: Callable[[Array, str], bool] | None = None


#: The eager plans (:func:`eager_plan`) per ``(block rows, in place, may_ignore, exp_into, assert_none)``.
_EAGER_PLANS: dict[tuple[int | None, bool, bool, Any, Any], Plan] = {}


def eager_plan(
    num_classes: int | None,
    in_place: bool,
    may_ignore: bool,
    exp_into: Callable[[Array], Array] | None = None,
    assert_none: Callable[[Array, str], bool] | None = None,
) -> Plan:
    """The plan of an eager call without autodiff or group: blocks of rows for ``num_classes``
    (:func:`multixent._blocked.block_rows_for`; None: one block), in place or not; built once per kind
    (the key holds Python numbers and functions, which ``torch.compile`` hashes: no memo)."""
    rows = None if num_classes is None else _blocked.block_rows_for(num_classes)
    key = (rows, in_place, may_ignore, exp_into, assert_none)
    found = _EAGER_PLANS.get(key)
    if found is None:
        found = _EAGER_PLANS[key] = Plan(rows, in_place, may_ignore, exp_into=exp_into, assert_none=assert_none)
    return found


def _fused_forwards(
    x: Array, target: Array, weight: Array | None, opts: F.Options, plan: Plan, xp: Namespace, need_lse: bool
) -> Iterator[_fused.Forward]:
    dtype = F.compute_dtype(x.dtype, xp)
    for a, b in blocks(x.shape[0], plan.block_rows):
        t_blk = rows_of(target, a, b)
        yield _fused.forward(rows_of(x, a, b), t_blk, weight, opts, plan, dtype, xp, for_grad=False, need_lse=need_lse)


def _one_block(
    x: Array,
    target: Array,
    weight: Array | None,
    opts: F.Options,
    plan: Plan,
    xp: Namespace,
    overwrite: bool,
    need_lse: bool,
) -> _fused.Forward:
    """The forward of all the rows as one block, for their loss alone."""
    dtype = F.compute_dtype(x.dtype, xp)
    if not plan.in_place:
        return _fused.forward(x, target, weight, opts, plan, dtype, xp, for_grad=False, need_lse=need_lse)
    out = x if overwrite and x.dtype == dtype else None  # exp(s) over the logits, or over a fresh s
    return _blocked.forward(x, target, weight, opts, plan, dtype, xp, out=out, need_lse=need_lse)


def _stats(f: _fused.Forward, xp: Namespace) -> tuple[Array, Array]:
    """The per-row ``(shift m, log Σ exp(z - m))`` the backward takes, 0 on ignored rows (zeroed for the gradient)."""
    if isinstance(f.targets, F.ClassTargets) and f.targets.counted is not None:
        return f.targets.zero_ignored(f.shift[:, 0], xp), f.targets.zero_ignored(f.lse_s, xp)
    return f.shift[:, 0], f.lse_s


def row_losses(
    x: Array,
    target: Array,
    weight: Array | None,
    opts: F.Options,
    plan: Plan,
    *,
    xp: Namespace,
    keep_stats: bool = False,
    overwrite: bool = False,
    need_lse: bool = True,
) -> tuple[Array, ...]:
    """Per-row ``(ce, lse)`` of 2-D logits ``x``, in the compute dtype.

    ``target`` is ``(rows,)`` class indices or ``(rows, C)`` probabilities;
    ``weight`` is None or ``(C,)`` in the compute dtype. Ignored rows give
    exactly 0 for both; counted out-of-range indices give NaN. ``keep_stats``
    also returns the per-row ``(shift m, log Σ exp(z - m))`` that
    :func:`row_losses_vjp` takes: ``exp(z - lse)`` would lose float32's
    precision at large logits (1e4 and beyond). ``overwrite``: ``x`` is a
    temporary of the caller's, which may be overwritten. ``need_lse=False``: ``lse`` is None
    (one operation less per block).
    """
    need_lse = need_lse or keep_stats
    if plan.block_rows is None or x.shape[0] <= plan.block_rows:  # one block: the shortest route
        f = _one_block(x, target, weight, opts, plan, xp, overwrite, need_lse)
        return (f.ce, f.lse, *_stats(f, xp)) if keep_stats else (f.ce, f.lse)
    if plan.in_place:
        runs = _blocked.forwards(x, target, weight, opts, plan, xp, overwrite=overwrite, need_lse=need_lse)
    else:
        runs = _fused_forwards(x, target, weight, opts, plan, xp, need_lse)
    # each block's per-row results, its logits-sized arrays let go
    parts = [(f.ce, f.lse, *_stats(f, xp)) if keep_stats else (f.ce, f.lse) for f in runs]
    if len(parts) == 1:
        return parts[0]
    return tuple(None if part[0] is None else xp.concat(part) for part in zip(*parts, strict=True))


def _output(
    x: Array, dtype: Any, spans: list[tuple[int, int]], plan: Plan, xp: Namespace, *, scratch: bool, overwrite: bool
) -> Any:
    """Where the gradient is written: :class:`multixent._blocked.Output` in place, else
    :class:`multixent._fused.Output`."""
    kind = _blocked.Output if plan.in_place else _fused.Output
    return kind(x, dtype, spans, xp, scratch=scratch, overwrite=overwrite)


def _forward_for_grad(
    x: Array,
    target: Array,
    weight: Array | None,
    opts: F.Options,
    plan: Plan,
    xp: Namespace,
    output: Any,
    span: tuple[int, int],
    dtype: Any,
    *,
    keep_s: bool = False,
    need_lse: bool = True,
) -> _fused.Forward:
    """The forward of block ``span`` whose gradient follows, in the compute ``dtype``: in place into the
    output's scratch, or fused (``keep_s``: the target's gradient needs ``s``, which an in-place ``exp``
    would overwrite)."""
    if plan.in_place and not keep_s:
        out, tanh_out = output.scratch(*span), output.tanh_scratch(span[1] - span[0], opts)
        return _blocked.forward(x, target, weight, opts, plan, dtype, xp, out=out, tanh_out=tanh_out, need_lse=need_lse)
    return _fused.forward(x, target, weight, opts, plan, dtype, xp, for_grad=True, need_lse=need_lse)


def _gradient(
    plan: Plan,
    output: Any,
    span: tuple[int, int],
    parts: tuple[Array, Array, Array | None, Any],
    weight: Array | None,
    ce_bar: Array,
    lse_bar: Array | None,
    opts: F.Options,
    xp: Namespace,
) -> Array:
    """Block ``span``'s gradient from ``parts = (e, sum_e, tanh, targets)``, put into the output."""
    e, sum_e, th, targets = parts
    if plan.in_place:
        dest = output.dest(*span)
        g = _blocked.gradient(e, sum_e, th, targets, weight, ce_bar, lse_bar, opts, xp, dest, plan.shard)
    else:
        g = _fused.gradient(e, sum_e, th, targets, weight, ce_bar, lse_bar, opts, xp, plan.shard)
    return output.put(*span, g)


def _softmax_parts(
    x: Array,
    target: Array,
    weight: Array | None,
    stats: tuple[Array, Array],
    opts: F.Options,
    plan: Plan,
    xp: Namespace,
    output: Any,
    span: tuple[int, int],
) -> tuple[Array, Array, Array | None, Any]:
    """``(e, sum_e, tanh, targets)`` of block ``span`` from the forward's per-row stats."""
    a, b = span
    m, lse_s = rows_of(stats[0], a, b), rows_of(stats[1], a, b)
    if plan.in_place:
        out, tanh_out = output.scratch(a, b), output.tanh_scratch(b - a, opts)
        return _blocked.from_stats(x, target, weight, (m, lse_s), opts, plan, xp, out=out, tanh_out=tanh_out)
    return _fused.from_stats(x, target, weight, (m, lse_s), opts, plan, xp)


def row_losses_vjp(
    x: Array,
    target: Array,
    weight: Array | None,
    stats: tuple[Array, Array] | None,
    ce_bar: Array,
    lse_bar: Array | None,
    opts: F.Options,
    plan: Plan,
    *,
    xp: Namespace,
    target_grad: bool = False,
    overwrite: bool = False,
) -> tuple[Array, Array | None]:
    """Gradients ``(x̄, t̄)`` of ``Σ_rows ce_bar·ce + lse_bar·lse``.

    ``stats`` are :func:`row_losses`' ``keep_stats`` outputs, or None to
    recompute them (which keeps the result differentiable, for double backward). ``t̄`` is
    computed for probability targets when ``target_grad``, else None. In place, each
    block is written into one output buffer: the peak is the gradient itself
    (``overwrite``: that buffer is ``x``, a temporary of the caller's).
    """
    dtype = F.compute_dtype(x.dtype, xp)
    spans = blocks(x.shape[0], plan.block_rows)
    output = _output(x, dtype, spans, plan, xp, scratch=False, overwrite=overwrite)
    w_local = F.local_weight(weight, plan.shard, x, xp)
    t_bar: Array = None
    if len(spans) > 1 and target_grad:
        t_bar = xp.empty(target.shape, dtype=target.dtype, device=device(x))
    g: Array = None
    for a, b in spans:
        x_blk, t_blk, ce_bar_blk = rows_of(x, a, b), rows_of(target, a, b), rows_of(ce_bar, a, b)
        tg = None
        if stats is None or target_grad:
            f = _forward_for_grad(x_blk, t_blk, weight, opts, plan, xp, output, (a, b), dtype, keep_s=target_grad)
            parts = (f.e, f.sum_e, f.tanh, f.targets)
            if target_grad:
                tg = xp.astype(F.target_grad(f.s, f.lse_s, ce_bar_blk, w_local, opts), target.dtype)
        else:
            parts = _softmax_parts(x_blk, t_blk, weight, stats, opts, plan, xp, output, (a, b))
        lse_bar_blk = None if lse_bar is None else rows_of(lse_bar, a, b)
        g = _gradient(plan, output, (a, b), parts, weight, ce_bar_blk, lse_bar_blk, opts, xp)
        if len(spans) == 1:
            return g, tg
        if tg is not None:
            t_bar = xpx.at(t_bar)[a:b, ...].set(tg)
    return g, t_bar


def _nonzero(a: Array | float) -> bool:
    """False for a Python 0 (a term known to vanish, skipped), True for anything else."""
    return not isinstance(a, (int, float)) or a != 0


def _as_rows(scale: Array | float, like: Array, xp: Namespace) -> Array:
    """A Python float or a 0-d array as an array of ``like``'s shape: a view where that shape is known
    (dask's may not be: rows selected by a lazy mask)."""
    if isinstance(scale, float):
        return full_like(like, scale, xp)
    if all(map(known_size, like.shape)):
        return xp.broadcast_to(scale, like.shape)
    return xp.zeros_like(like) + scale


def row_losses_and_grad(
    x: Array,
    target: Array,
    weight: Array | None,
    ce_scale: Array | float,
    lse_scale: Array | float,
    opts: F.Options,
    plan: Plan,
    *,
    xp: Namespace,
    overwrite: bool = False,
    need_lse: bool = True,
) -> tuple[Array, Array, Array]:
    """``(ce, lse, x̄)`` in one pass, for ``ce_bar = ce_scale`` and ``lse_bar = lse_scale·lse``
    (``need_lse=False`` and ``lse_scale`` 0: ``lse`` is None).

    This is the gradient of ``ce_scale·Σce + lse_scale/2·Σlse²`` (sum and mean
    reductions), reusing each block's ``exp(s)`` for the softmax. ``overwrite``:
    ``x`` is a temporary of the caller's, and in place becomes ``x̄``.
    """
    dtype = F.compute_dtype(x.dtype, xp)
    spans = blocks(x.shape[0], plan.block_rows)
    output = _output(x, dtype, spans, plan, xp, scratch=True, overwrite=overwrite)
    need_lse = need_lse or _nonzero(lse_scale)
    ces, lses = [], []
    g: Array = None
    for a, b in spans:
        x_blk, t_blk = rows_of(x, a, b), rows_of(target, a, b)
        f = _forward_for_grad(x_blk, t_blk, weight, opts, plan, xp, output, (a, b), dtype, need_lse=need_lse)
        ce_bar = _as_rows(ce_scale, f.ce, xp)
        lse_bar = lse_scale * f.lse if _nonzero(lse_scale) and f.lse is not None else None
        g = _gradient(plan, output, (a, b), (f.e, f.sum_e, f.tanh, f.targets), weight, ce_bar, lse_bar, opts, xp)
        ces.append(f.ce)
        lses.append(f.lse)
    if len(spans) == 1:
        return ces[0], lses[0], g
    return xp.concat(ces), None if lses[0] is None else xp.concat(lses), g


def row_losses_jvp(
    x: Array,
    target: Array,
    weight: Array | None,
    x_dot: Array | None,
    target_dot: Array | None,
    opts: F.Options,
    plan: Plan,
    *,
    xp: Namespace,
    weight_dot: Array | None = None,
) -> tuple[Array, Array, Array, Array]:
    """``(ce, lse, ce_dot, lse_dot)``: the forward and its tangent, in one block.

    ``ce_dot = Σ_c ∂ce/∂x_c · ẋ_c (+ Σ_c ∂ce/∂t_c · ṫ_c + Σ_c ∂ce/∂w_c · ẇ_c)`` from the
    closed-form gradients, sharing ``exp(s)`` with the forward; a tangent that is None is 0.
    With a shard, the class sums of the tangents span the group (``weight_dot`` is ``(C,)``).
    """
    shard = plan.shard
    f = _fused.forward(x, target, weight, opts, plan, F.compute_dtype(x.dtype, xp), xp, for_grad=True)
    ce_dot = lse_dot = xp.zeros_like(f.ce)
    if x_dot is not None:
        ce_dot, lse_dot = _logits_tangent(f, x, x_dot, weight, opts, xp, shard)
    if target_dot is not None:
        t_grad = F.target_grad(f.s, f.lse_s, xp.ones_like(f.ce), F.local_weight(weight, shard, x, xp), opts)
        ce_dot = ce_dot + xp.sum(t_grad * target_dot, axis=-1)
    if weight_dot is not None:
        w_dot = F.local_weight(weight_dot, shard, x, xp)
        ce_dot = ce_dot + xp.sum(
            F.weight_coefficients(f.s, f.lse_s, f.targets, target, opts, xp, shard) * w_dot, axis=-1
        )
    if x_dot is not None or target_dot is not None or weight_dot is not None:
        ce_dot, lse_dot = F.group_sums(shard, xp, ce_dot, lse_dot)
    return f.ce, f.lse, ce_dot, lse_dot


def _logits_tangent(
    f: _fused.Forward, x: Array, x_dot: Array, weight: Array | None, opts: F.Options, xp: Namespace, shard: Any
) -> tuple[Array, Array]:
    """``(ce_dot, lse_dot)`` along the logits' tangent ``x_dot`` (:func:`multixent._formulas.loss_tangent`;
    ``lse_dot = softmax · x_dot``), the member's class sums."""
    if f.tanh is not None:  # the tangent through the softcap, ẋ·(1 - tanh²), with tanh recomputed (of -x/s):
        # XLA then neither merges it with the forward's tanh(x/s) nor keeps that one for two consumers
        counted = f.targets.counted if isinstance(f.targets, F.ClassTargets) else None
        th = xp.tanh(-F.prepare_logits(x, counted, F.Options(), f.e.dtype, xp)[0] / opts.softcap)
        x_dot = x_dot * F.softcap_factor(th, xp)
    r, d, a = F.grad_terms(f.sum_e, f.targets, weight, xp.ones_like(f.ce), None, opts, xp, f.e, shard)
    e_dot = xp.sum(f.e * x_dot, axis=-1)
    index = f.targets.index if a is not None else None
    return F.loss_tangent(r, d, a, e_dot, x_dot, index, xp), e_dot / f.sum_e


def row_losses_weight_vjp(
    x: Array,
    target: Array,
    weight: Array | None,
    ce_bar: Array,
    opts: F.Options,
    plan: Plan,
    *,
    xp: Namespace,
) -> Array:
    """``w̄_c = Σ_rows ce_bar · ∂ce/∂w_c`` (:func:`multixent._formulas.weight_coefficients`), in the
    compute dtype. Recomputes the forward, block by block, with differentiable operations."""
    dtype = F.compute_dtype(x.dtype, xp)
    w_bar: Array = None
    for a, b in blocks(x.shape[0], plan.block_rows):
        t_blk = rows_of(target, a, b)
        f = _fused.forward(rows_of(x, a, b), t_blk, weight, opts, plan, dtype, xp, for_grad=True)
        coefficients = F.weight_coefficients(f.s, f.lse_s, f.targets, t_blk, opts, xp)
        part = xp.sum(xp.astype(rows_of(ce_bar, a, b), dtype)[:, None] * coefficients, axis=0)
        w_bar = part if w_bar is None else w_bar + part
    return w_bar
