"""Array-API-generic math: logsumexp, log_softmax, and the cross-entropy rows.

Every function takes the namespace ``xp`` and never names a framework. The
cross-entropy works on 2-D ``(rows, C)`` logits with the class axis last and
returns per-row terms; reductions live in :mod:`multixent._api`.

Per row, with ``s = z - m`` the logits shifted by their (finite) maximum,
``lse_s = log Σ_c exp(s_c)``, smoothing ``ε`` and class weights ``w``::

    class index y:      ce = (1-ε) w_y (lse_s - s_y) + ε/C Σ_c w_c (lse_s - s_c)
    probabilities t:    ce = Σ_c t'_c w_c (lse_s - s_c),   t' = (1-ε) t + ε/C
    and                 lse = lse_s + m

With the class axis split over a group (:class:`Shard`), each member holds ``C_local``
consecutive classes: the row max and the class sums above (``Σ_c exp(s_c)``, the
target's logit, ``Σ_c w_c z_c``, ``Σ_c t'_c w_c s_c``, ``Σ_c t'_c w_c``) are reduced over
the member's classes, then across the group (``Shard.max``, ``Shard.sum``: a few
``(rows,)`` vectors, never the logits); ``C`` and the weights' sums are global, and the
gradient below is local once ``lse`` is known.

Their gradient has the closed form used by :func:`row_losses_vjp`::

    ∂ce/∂z = softmax(z) · Σ_c a_c - a,   ∂lse/∂z = softmax(z)

with ``a`` the weighted target distribution above (``a_c = (1-ε) w_y [c=y] +
ε/C w_c`` or ``t'_c w_c``), times ``1 - tanh²(x/s)`` under ``softcap=s``; and
with respect to the class weights (:func:`row_losses_weight_vjp`)::

    class index y:      ∂ce/∂w_c = (1-ε) [c=y] (lse_s - s_y) + ε/C (lse_s - s_c)
    probabilities t:    ∂ce/∂w_c = t'_c (lse_s - s_c)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_extra as xpx

from ._compat import (
    clip,
    device,
    exp,
    float_bits,
    full_like,
    max_along,
    memo,
    row_max,
    row_sum,
    subtract_at_rows,
    subtract_at_rows_copy,
    take_rows,
)

Array = Any
Namespace = Any


@dataclass(frozen=True)
class Options:
    """What the user asked: the validated, hashable options of one call (built once, in ``_checks``)."""

    ignore_index: int = -100
    #: Python floats, or 0-d arrays of the logits' library (traced or differentiated): then the
    #: adapters let the framework differentiate the math itself (no custom rule, :attr:`arrays`)
    label_smoothing: float | Array = 0.0
    softcap: float | Array | None = None

    @property
    def arrays(self) -> tuple[Array, ...]:
        """The options that are arrays (not Python floats)."""
        smoothing, cap = self.label_smoothing, self.softcap
        if isinstance(smoothing, float) and (cap is None or isinstance(cap, float)):  # the usual case
            return ()
        return tuple(v for v in (smoothing, cap) if v is not None and not isinstance(v, float))

    def astype(self, dtype: Any, xp: Namespace) -> Options:
        """The array options cast to ``dtype`` (the compute dtype: an option never promotes the logits)."""

        def cast(v: Any) -> Any:
            return v if v is None or isinstance(v, float) else xp.astype(v, dtype)

        return Options(self.ignore_index, cast(self.label_smoothing), cast(self.softcap)) if self.arrays else self


def is_set(eps: float | Array) -> bool:
    """Whether the smoothing term is computed: a nonzero float, or an array (its value unknown, maybe 0)."""
    return not isinstance(eps, float) or eps != 0.0


def _identity(a: Array) -> Array:
    return a


def _raise_local(error: BaseException | None) -> None:
    if error is not None:
        raise error


@dataclass(frozen=True, eq=False)
class Shard:
    """The class axis split over a group: this member holds the global classes
    ``[offset(), offset() + C_local)`` of ``num_classes``; supplied by an adapter.

    ``max`` and ``sum`` reduce an array elementwise across the group (``max``
    is not differentiated; ``sum`` is differentiated as the identity: its result
    is the same on every member); ``spread`` marks a replicated per-row value
    entering a member's own (sharded) result, so that its gradient sums the
    members' contributions (identity where the framework infers it).
    """

    num_classes: int
    offset: Callable[[], Any]
    max: Callable[[Array], Array]
    sum: Callable[[Array], Array]
    spread: Callable[[Array], Array] = _identity
    #: ``agree(error)``: raise on every member the error any member has (the same class and
    #: message on each); the default raises the local one (members trace alike).
    agree: Callable[[BaseException | None], None] = _raise_local


def _group_max(a: Array, shard: Shard | None) -> Array:
    return a if shard is None else shard.max(a)


def _group_sums(shard: Shard | None, xp: Namespace, *values: Array | None) -> tuple[Array, ...]:
    """Each value (of one shape; None: skipped) summed across the group, in one reduction."""
    if shard is None:
        return values
    given = [v for v in values if v is not None]
    summed = shard.sum(xp.stack(given))
    out, i = [], 0
    for v in values:
        out.append(None if v is None else summed[i, ...])
        i += v is not None
    return tuple(out)


def _num_classes(num_local: int, shard: Shard | None) -> int:
    """The global number of classes."""
    return num_local if shard is None else shard.num_classes


def local_weight(weight: Array | None, shard: Shard | None, x: Array, xp: Namespace) -> Array | None:
    """The member's slice of the full ``(C,)`` class weights, for its ``(rows, C_local)`` logits ``x``."""
    if weight is None or shard is None:
        return weight
    return xp.take(weight, shard.offset() + xp.arange(x.shape[-1], device=device(x)))


@dataclass(frozen=True)
class Plan:
    """How one call is executed: chosen by the adapter (its ``plan``), never by the user."""

    #: Rows per block (None: one block). Eager backends block for the cache (:data:`BLOCK_ELEMENTS`).
    block_rows: int | None = None
    #: True when arrays may be written in place and the namespace's functions
    #: take ``out=`` (NumPy, eager torch; never while autodiff records): each
    #: block's ``exp(z - m)`` is written into a reused buffer or straight into
    #: its slice of the gradient and updated there, and the target's entry is
    #: one scatter instead of a one-hot ``where`` over the block (which XLA fuses).
    #: Fewer, larger operations: no block-sized temporaries, fewer passes.
    in_place: bool = False
    #: False when the caller has seen the class indices (concrete values): none
    #: is ignore_index and all are in range. Saves a pass over the logits that
    #: zeroes the ignored rows, and the per-row masks.
    may_ignore: bool = True
    #: The framework's stop-gradient (None without autodiff), applied to the
    #: shift by the row max, whose derivative cancels exactly.
    stop_gradient: Callable[[Array], Array] | None = None
    #: The class axis split over a group (None: all classes here).
    shard: Shard | None = None


#: The eager plans (:func:`eager_plan`) per ``(block rows, in place, may_ignore)``.
_EAGER_PLANS: dict[tuple[int | None, bool, bool], Plan] = {}


def eager_plan(num_classes: int | None, in_place: bool, may_ignore: bool) -> Plan:
    """The plan of an eager call without autodiff or group: blocks of rows for ``num_classes``
    (:func:`block_rows_for`; None: one block), in place or not; built once per kind (the key holds
    Python numbers only, which ``torch.compile`` hashes: no :func:`memo`)."""
    rows = None if num_classes is None else block_rows_for(num_classes)
    key = (rows, in_place, may_ignore)
    found = _EAGER_PLANS.get(key)
    if found is None:
        found = _EAGER_PLANS[key] = Plan(rows, in_place, may_ignore)
    return found


#: Per ``(namespace, dtype)``: the compute dtype and its largest finite value.
_COMPUTE: dict[tuple[Namespace, Any], tuple[Any, float]] = {}


def _compute(dtype: Any, xp: Namespace) -> tuple[Any, float]:
    def compute() -> tuple[Any, float]:
        wide = xp.float32 if float_bits(dtype, xp) < 32 else dtype
        return wide, float(xp.finfo(wide).max)

    return memo(_COMPUTE, (xp, dtype), compute)


def compute_dtype(dtype: Any, xp: Namespace) -> Any:
    """float16/bfloat16 are computed in float32; wider floats as they are."""
    return _compute(dtype, xp)[0]


def _finite_shift(top: Array, xp: Namespace) -> Array:
    """The row max ``top`` clipped to the finite range, the shift of ``z - m``.

    Finite maxima are unchanged; a ``±inf`` one becomes ``±max``, which gives the results
    of SciPy's rule (shift by 0 where the max is not finite): ``+inf`` entries stay ``+inf``,
    finite ones underflow to ``exp = 0``, a row of ``-inf`` gives ``log 0 = -inf``; NaN stays.
    One operation, where ``where(isfinite(top), top, 0)`` is up to six (torch).
    """
    big = _compute(top.dtype, xp)[1]
    return clip(top, -big, big, xp)


def _shift_and_log1p(x: Array, axis: int, xp: Namespace, shard: Shard | None = None) -> tuple[Array, Array]:
    """``(m, L)`` (keepdims) with ``logsumexp(x) = m + L``, as SciPy's ``logsumexp``.

    ``m`` is the row max where finite (else 0) and, there, ``L = log1p(Σ_{i≠k} exp(x_i - m))``
    with ``k`` one maximal entry (the other maxima add 1 each): the dominant term is kept out
    of the sum, so ``logsumexp([0, -40])`` is ``exp(-40)``, not 0. Where the max is ±inf
    or NaN, ``L`` is that max (the naive formula's value). A maximal entry adds
    ``exp(x_k - m) - 1``: exactly 0, with the derivative of its exponential, so
    the gradient is the softmax even where ``m`` is not differentiated (a ``shard``'s
    max). With a ``shard`` the max and sums span the group.
    """
    top = _group_max(max_along(x, axis, xp), shard)
    finite = xp.isfinite(top)
    m = xp.where(finite, top, 0.0)
    is_top = x == top
    rest = xp.sum(xp.exp(x - m) - xp.astype(is_top, x.dtype), axis=axis, keepdims=True)
    ties = xp.sum(xp.astype(is_top, x.dtype), axis=axis, keepdims=True)
    if shard is not None:
        rest, ties = _group_sums(shard, xp, rest, ties)
    return m, xp.where(finite, xp.log1p((ties - 1.0) + rest), top)


def logsumexp(x: Array, /, *, axis: int, keepdims: bool, xp: Namespace, shard: Shard | None = None) -> Array:
    """``log Σ exp(x)`` along ``axis`` (see :func:`_shift_and_log1p`); ``-inf`` for an empty axis."""
    z = xp.astype(x, compute_dtype(x.dtype, xp), copy=False)
    m, log1p_rest = _shift_and_log1p(z, axis, xp, shard)
    out = xp.astype(m + log1p_rest, x.dtype, copy=False)
    return out if keepdims else xp.squeeze(out, axis=axis)


def log_softmax(x: Array, /, *, axis: int, xp: Namespace, shard: Shard | None = None) -> Array:
    """``x - logsumexp(x)`` along ``axis``, as ``(x - m) - L`` (see :func:`_shift_and_log1p`)."""
    z = xp.astype(x, compute_dtype(x.dtype, xp), copy=False)
    m, log1p_rest = _shift_and_log1p(z, axis, xp, shard)
    if shard is not None:
        log1p_rest = shard.spread(log1p_rest)
    return xp.astype((z - m) - log1p_rest, x.dtype, copy=False)


# --------------------------------------------------------------------------
# Targets of one block of rows


@dataclass
class _ClassTargets:
    """Class-index targets of a block: which rows count, and their weights."""

    index: Array  # (n,) clipped into [0, C)
    counted: Array | None  # (n,) bool: not ignore_index (None: every row)
    poisoned: Array | None  # (n,) bool: counted but out of [0, C) -> NaN (None: no row)
    weight_at_target: Array | float  # (n,) w_y, or 1.0
    here: Array | None = None  # (n,) bool: y is among this shard's classes (None: unsharded); index is local

    def mask(self, values: Array, xp: Namespace) -> Array:
        """``values`` on counted rows, 0 on ignored ones."""
        return values if self.counted is None else xp.where(self.counted, values, 0.0)

    def poison(self, values: Array, xp: Namespace) -> Array:
        """:meth:`mask`, and NaN on rows whose class index is out of range."""
        values = self.mask(values, xp)
        return values if self.poisoned is None else xp.where(self.poisoned, math.nan, values)


def class_targets(
    target: Array,
    weight: Array | None,
    num_classes: int,
    opts: Options,
    xp: Namespace,
    *,
    may_ignore: bool = True,
    shard: Shard | None = None,
    num_local: int = 0,
) -> _ClassTargets:
    """The rows' classes and weights; ``may_ignore=False``: the indices were checked (none ignored).

    ``num_classes`` is the global C and ``weight`` the full ``(C,)``; with a ``shard`` of
    ``num_local`` classes, ``index`` is the local one (0 where ``y`` is on another shard).
    """
    if may_ignore:
        counted = target != opts.ignore_index
        in_range = (target >= 0) & (target < num_classes)
        index, poisoned = xp.where(counted & in_range, target, 0), counted & ~in_range
    else:  # checked concretely: every row counts and is in range
        index, counted, poisoned = target, None, None
    w_y = 1.0 if weight is None else xp.take(weight, index)
    here = None
    if shard is not None:
        local = index - shard.offset()
        here = (local >= 0) & (local < num_local)
        index = xp.where(here, local, 0)
    return _ClassTargets(index, counted, poisoned, w_y, here)


def gather_rows(x: Array, index: Array, xp: Namespace) -> Array:
    """``x[i, index[i]]`` for each row ``i`` of 2-D ``x`` (``index`` in range).

    The namespace's ``take_along_axis``; where it has none (dask), a one-hot
    select summed along the row: elementwise and a row reduction, so it works
    on lazy arrays chunked along either axis.
    """
    if hasattr(xp, "take_along_axis") and x.shape[-1]:
        return take_rows(x, index, xp)
    classes = xp.arange(x.shape[-1], dtype=index.dtype, device=device(x))
    return xp.sum(xp.where(classes == index[:, None], x, 0.0), axis=-1)


def _smoothed(t: Array, num_classes: int, opts: Options, weight: Array | None) -> Array:
    """``((1-ε) t + ε/C) · w`` for probability targets."""
    eps = opts.label_smoothing
    if is_set(eps):
        t = t * (1.0 - eps) + eps / num_classes
    return t if weight is None else t * weight


def prepare_logits(
    x: Array, counted: Array | None, opts: Options, dtype: Any, xp: Namespace
) -> tuple[Array, Array | None]:
    """Upcast, zero the ignored rows (so no NaN/inf reaches any gradient), softcap.

    Returns the logits to use and ``tanh(x/s)`` (None without softcap).
    """
    z = x if x.dtype == dtype else xp.astype(x, dtype)
    if counted is not None:
        z = xp.where(counted[:, None], z, 0.0)
    if opts.softcap is None:
        return z, None
    th = xp.tanh(z / opts.softcap)
    return opts.softcap * th, th


def _row_sum_weighted(s: Array, weight: Array | None, xp: Namespace) -> Array:
    """``Σ_c w_c s_c`` per row (``Σ_c s_c`` without weights)."""
    return xp.sum(s, axis=-1) if weight is None else xp.sum(s * weight, axis=-1)


# --------------------------------------------------------------------------
# The cross-entropy rows: forward, closed-form gradient, tangents


@dataclass
class _Block:
    """Forward quantities of one block of rows, kept for its gradient."""

    ce: Array  # (n,)
    lse: Array | None  # (n,), 0 on ignored rows (None: not asked for)
    s: Array | None  # (n, C) logits minus their finite row max (None: overwritten by e)
    shift: Array  # (n, 1) the finite row max m, s = z - m
    sum_e: Array  # (n,) Σ exp(s), lse_s = log(sum_e)
    lse_s: Array  # (n,) log Σ exp(s)
    e: Array  # (n, C) exp(s)
    tanh: Array | None  # tanh(x/softcap), or None
    targets: Any  # _ClassTargets, or the (n, C) smoothed weighted probabilities


def _forward_block(
    x: Array,
    target: Array,
    weight: Array | None,
    opts: Options,
    plan: Plan,
    dtype: Any,
    xp: Namespace,
    *,
    for_grad: bool,
    out: Array | None = None,
    reuse: bool = False,
    tanh_out: Array | None = None,
    need_lse: bool = True,
) -> _Block:
    """Forward of one block of rows; ``exp(s)`` is written into ``out`` when given (which may be ``x``),
    or with ``reuse`` (in place, one block) over ``s``, a fresh array: no buffer. ``tanh_out``: where
    ``tanh(x/softcap)`` is kept for the gradient when ``out`` is given. ``need_lse=False``: no ``lse``.

    ``for_grad`` zeroes the ignored rows' logits first, so that their NaN or
    inf never reaches a gradient (in place, :func:`_grad_block` zeroes those
    rows of its result instead). A value-only forward masks the per-row
    results: on the CPU, XLA cannot fuse a ``where`` over the logits into its
    reductions and would materialise it.
    """
    shard, num_local = plan.shard, x.shape[-1]
    num_classes = _num_classes(num_local, shard)
    cls = None
    if target.ndim == 1:
        cls = class_targets(
            target, weight, num_classes, opts, xp, may_ignore=plan.may_ignore, shard=shard, num_local=num_local
        )
    w_local = local_weight(weight, shard, x, xp)
    counted = None if cls is None or not for_grad or plan.in_place else cls.counted
    owned = out is not None or reuse  # exp(s) overwrites s: s_y and the smoothing sum come from s first
    z, th = _logits_for(x, out, counted, opts, dtype, xp, tanh_out)
    z = _in_buffer(z, out)
    if reuse and out is None and z is not x:  # z is a fresh array of ours (a cast, a softcap): s goes over it
        out = z
    # the preparation is monotonic: max(z) = prepare(max(x)), and XLA need not materialise z
    m = row_max(z, xp) if z is out else None
    m = prepare_logits(row_max(x, xp), counted, opts, dtype, xp)[0] if m is None else m
    if plan.stop_gradient is not None:
        m = plan.stop_gradient(m)
    m = _finite_shift(_group_max(m, shard), xp)  # after the group's max: one shift on every member
    if cls is not None and not owned:  # gather from the input (XLA materialises a gather's operand)
        x_y = gather_rows(x, cls.index, xp)[:, None]
        y_term = prepare_logits(x_y, counted, opts, dtype, xp)[0][:, 0]  # z_y
    s, exp_s = _exp_shifted(z, m, out, xp, reuse)
    if cls is not None and owned:  # in place: s_y from s, before exp(s) overwrites it
        y_term = gather_rows(s, cls.index, xp)
    if cls is not None and cls.here is not None:  # the target's term: from the one shard holding it
        y_term = xp.where(cls.here, y_term, 0.0)
    eps = opts.label_smoothing
    if cls is None:
        tw = _smoothed(xp.astype(target, dtype), num_classes, opts, w_local)
        tws = xp.sum(xp.where(tw == 0, 0.0, tw * s), axis=-1)  # before exp(s) may overwrite s
        e = exp_s()
        sum_e, tws, tw_sum = _group_sums(shard, xp, row_sum(e, xp), tws, row_sum(tw, xp))
        lse_s = xp.log(sum_e)
        ce = lse_s * tw_sum - tws
        lse = lse_s + m[:, 0] if need_lse else None
        return _Block(ce, lse, None if owned else s, m, sum_e, lse_s, e, th, tw)
    w_sum = (num_classes if weight is None else xp.sum(weight)) if is_set(eps) else None
    smooth_sum = None
    if is_set(eps) and owned:  # before exp(s) overwrites s
        smooth_sum = _row_sum_weighted(s, w_local, xp)
    elif is_set(eps) and counted is not None and opts.softcap is None:
        # from the unmasked logits, masked per row: XLA would keep the masked logits for a second
        # reduction (the gradient's); an ignored row's cotangent is 0, so w_c · 0 reaches its logits
        unmasked = prepare_logits(x, None, opts, dtype, xp)[0]
        smooth_sum = xp.where(counted, _row_sum_weighted(unmasked, w_local, xp), 0.0)
    elif is_set(eps):  # Σ w_c z_c - m Σ w_c: from z, so that a compiler (XLA) need not keep s for a second reduction
        smooth_sum = _row_sum_weighted(z, w_local, xp)
    e = exp_s()
    sum_e, y_term, smooth_sum = _group_sums(shard, xp, row_sum(e, xp), y_term, smooth_sum)
    if is_set(eps) and not owned:
        smooth_sum = smooth_sum - m[:, 0] * w_sum
    lse_s = xp.log(sum_e)
    s_y = y_term if owned else y_term - m[:, 0]
    ce = _scaled(lse_s - s_y, (1.0 - eps) * cls.weight_at_target)
    if smooth_sum is not None:
        ce = ce + eps / num_classes * (w_sum * lse_s - smooth_sum)
    ce = cls.poison(ce, xp)
    lse = cls.mask(lse_s + m[:, 0], xp) if need_lse else None
    return _Block(ce, lse, None if owned else s, m, sum_e, lse_s, e, th, cls)


def _grad_block(
    e: Array,
    e_scale: Array,
    th: Array | None,
    targets: Any,
    weight: Array | None,
    ce_bar: Array,
    lse_bar: Array,
    opts: Options,
    in_place: bool,
    xp: Namespace,
    out: Array | None = None,
    shard: Shard | None = None,
) -> Array:
    """``ce_bar·∂ce/∂x + lse_bar·∂lse/∂x`` for one block, from ``softmax = e·e_scale`` (per row):
    :func:`_grad_terms` put together.

    In place (``in_place``) the result is written into ``out``, or over ``e``. ``weight``
    is the full ``(C,)``; with a ``shard`` the block is its classes (a local gradient).
    """
    r, d, a = _grad_terms(e_scale, targets, weight, ce_bar, lse_bar, opts, xp, e, shard)
    g = _times(e, r[:, None], in_place, out, xp)
    if d is not None:
        g = _minus(g, d, in_place)
    if a is not None and g.shape[-1]:  # (no class here: no target either)
        g = _subtract_at(g, targets.index, a, in_place, xp)
    if th is not None and in_place:  # 1 - tanh² over tanh (the block's own): no temporary
        th *= th
        th *= -1.0
        th += 1.0
        g = _times(g, th, in_place)
    elif th is not None:
        g = _times(g, 1.0 - th * th, in_place)
    if in_place and isinstance(targets, _ClassTargets) and targets.counted is not None:
        # in place, the ignored rows' logits were not zeroed: their NaN/inf ends here
        g[~targets.counted, ...] = 0.0
    return g


def _grad_terms(
    e_scale: Array,
    targets: Any,
    weight: Array | None,
    ce_bar: Array,
    lse_bar: Array | None,
    opts: Options,
    xp: Namespace,
    block: Array,
    shard: Shard | None = None,
) -> tuple[Array, Array | None, Array | None]:
    """The gradient of :func:`_grad_block` before its softcap factor as three terms ``(r, d, a)``:
    ``∂ = e·r[:, None] - d``, then ``∂[i, y_i] -= a[i]`` (``d``, ``a`` None: no such term).

    Class indices: ``r = e_scale·(ce_bar·((1-ε) w_y + ε/C Σw) + lse_bar)``, ``d = ce_bar·ε/C·w`` and
    ``a = ce_bar·(1-ε)·w_y``; probabilities: ``r = e_scale·(ce_bar·Σt + lse_bar)``, ``d = ce_bar·t``.
    ``block``: the block's ``(rows, C_local)`` logits or ``e``.
    """
    num_classes = _num_classes(block.shape[-1], shard)
    eps = opts.label_smoothing
    if not isinstance(targets, _ClassTargets):
        (t_sum,) = _group_sums(shard, xp, xp.sum(targets, axis=-1))
        return _plus(ce_bar * t_sum, lse_bar) * e_scale, ce_bar[:, None] * targets, None
    w_sum = num_classes if weight is None else xp.sum(weight)
    total = (1.0 - eps) * targets.weight_at_target + eps / num_classes * w_sum
    r = targets.poison(_plus(_scaled(ce_bar, total), lse_bar), xp) * e_scale
    d = None
    if is_set(eps):
        smooth = targets.mask(ce_bar * (eps / num_classes), xp)[:, None]
        d = smooth if weight is None else smooth * local_weight(weight, shard, block, xp)
    if isinstance(eps, float) and eps >= 1:
        return r, d, None
    a = targets.mask(_scaled(ce_bar, (1.0 - eps) * targets.weight_at_target), xp)
    return r, d, a if targets.here is None else xp.where(targets.here, a, 0.0)


def _scaled(a: Array, factor: Array | float) -> Array:
    """``factor · a``, skipping a product by a Python 1.0 (no weights, no smoothing)."""
    return a if isinstance(factor, float) and factor == 1.0 else factor * a


def _nonzero(a: Array | float) -> bool:
    """False for a Python 0 (a term known to vanish, skipped), True for anything else."""
    return not isinstance(a, (int, float)) or a != 0


def _plus(a: Array, b: Array | None) -> Array:
    """``a + b``; ``b`` None is 0 (an output whose gradient autograd did not materialise)."""
    return a if b is None else a + b


def row_losses(
    x: Array,
    target: Array,
    weight: Array | None,
    opts: Options,
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
    dtype = compute_dtype(x.dtype, xp)
    in_x = plan.in_place and overwrite and x.dtype == dtype  # each block's exp(s) over its logits
    if _one_block(x, plan):  # the shortest route: exp(s) over s (or over x), no buffer
        blk = _forward_block(
            x,
            target,
            weight,
            opts,
            plan,
            dtype,
            xp,
            for_grad=False,
            out=x if in_x else None,
            reuse=plan.in_place,
            need_lse=need_lse or keep_stats,
        )
        return (blk.ce, blk.lse, *_stats(blk, xp)) if keep_stats else (blk.ce, blk.lse)
    blocks = _blocks(x.shape[0], plan.block_rows)
    buffer: Array = None
    if plan.in_place and not in_x:  # one block-sized buffer for every block's exp(s)
        buffer = xp.empty((max(b - a for a, b in blocks), x.shape[-1]), dtype=dtype, device=device(x))
    outs: list[tuple[Array, ...]] = []
    for a, b in blocks:
        out = x[a:b, ...] if in_x else None if buffer is None else _rows(buffer, 0, b - a)
        blk = _forward_block(
            _rows(x, a, b),
            _rows(target, a, b),
            weight,
            opts,
            plan,
            dtype,
            xp,
            for_grad=False,
            out=out,
            need_lse=need_lse,
        )
        outs.append((blk.ce, blk.lse, *_stats(blk, xp)) if keep_stats else (blk.ce, blk.lse))
        # and let the block's logits-sized temporaries go
    if len(outs) == 1:
        return outs[0]
    return tuple(None if parts[0] is None else xp.concat(parts) for parts in zip(*outs, strict=True))


def _stats(blk: _Block, xp: Namespace) -> tuple[Array, Array]:
    """The per-row ``(shift m, log Σ exp(z - m))`` the backward takes, 0 on ignored rows (zeroed for the gradient)."""
    if isinstance(blk.targets, _ClassTargets) and blk.targets.counted is not None:
        return blk.targets.mask(blk.shift[:, 0], xp), blk.targets.mask(blk.lse_s, xp)
    return blk.shift[:, 0], blk.lse_s


def _target_grad(blk: _Block, ce_bar: Array, weight: Array | None, opts: Options) -> Array:
    """``∂ce/∂t = -(1-ε) w log_softmax(z)`` scaled by ``ce_bar`` (``weight``: the block's classes')."""
    log_p = blk.s - blk.lse_s[:, None]
    scale = -(1.0 - opts.label_smoothing) * ce_bar[:, None]
    return scale * log_p if weight is None else scale * weight * log_p


def _weight_coefs(blk: _Block, target: Array, opts: Options, xp: Namespace, shard: Shard | None = None) -> Array:
    """``∂ce/∂w`` of each row of a block, ``(n, C)``: ``a_c (lse_s - s_c)`` with ``a`` the
    unweighted target distribution (``(1-ε)[c=y] + ε/C``, or ``t'``); 0 where ``a_c`` is 0
    and the logit is not finite (an ignored row's NaN, a -inf logit).

    ``blk`` comes from :func:`_forward_block` without ``out`` (``blk.s`` kept).
    """
    s = blk.s
    assert s is not None
    num_classes = _num_classes(s.shape[-1], shard)
    eps = opts.label_smoothing
    if isinstance(blk.targets, _ClassTargets):
        cls = blk.targets
        classes = xp.arange(s.shape[-1], dtype=cls.index.dtype, device=device(s))
        at_y = classes == cls.index[:, None]
        if cls.here is not None:
            at_y = at_y & cls.here[:, None]
        a = (1.0 - eps) * xp.astype(at_y, s.dtype) + eps / num_classes
        if cls.counted is not None:
            a = xp.where(cls.counted[:, None], a, 0.0)
        if cls.poisoned is not None:
            a = xp.where(cls.poisoned[:, None], math.nan, a)
    else:
        a = _smoothed(xp.astype(target, s.dtype), num_classes, opts, None)
    nlp = blk.lse_s[:, None] - s  # -log softmax
    return a * xp.where((a == 0) & ~xp.isfinite(nlp), 0.0, nlp)


def row_losses_weight_vjp(
    x: Array,
    target: Array,
    weight: Array | None,
    ce_bar: Array,
    opts: Options,
    plan: Plan,
    *,
    xp: Namespace,
) -> Array:
    """``w̄_c = Σ_rows ce_bar · ∂ce/∂w_c`` (:func:`_weight_coefs`), in the compute dtype.

    Recomputes the forward, block by block, with differentiable operations.
    """
    dtype = compute_dtype(x.dtype, xp)
    w_bar: Array = None
    for a, b in _blocks(x.shape[0], plan.block_rows):
        t_blk = _rows(target, a, b)
        blk = _forward_block(_rows(x, a, b), t_blk, weight, opts, plan, dtype, xp, for_grad=True)
        part = xp.sum(xp.astype(_rows(ce_bar, a, b), dtype)[:, None] * _weight_coefs(blk, t_blk, opts, xp), axis=0)
        w_bar = part if w_bar is None else w_bar + part
    return w_bar


def row_losses_vjp(
    x: Array,
    target: Array,
    weight: Array | None,
    stats: tuple[Array, Array] | None,
    ce_bar: Array,
    lse_bar: Array,
    opts: Options,
    plan: Plan,
    *,
    xp: Namespace,
    target_grad: bool = False,
    overwrite: bool = False,
) -> tuple[Array, Array | None]:
    """Gradients ``(x̄, t̄)`` of ``Σ_rows ce_bar·ce + lse_bar·lse``.

    ``stats`` are :func:`row_losses`' ``keep_stats`` outputs, or None to
    recompute them (which keeps the result differentiable, for double backward). ``t̄`` is
    computed for probability targets when ``target_grad``, else None. Each
    block is written into one output buffer: the peak is the gradient itself
    (``overwrite``: that buffer is ``x``, a temporary of the caller's).
    """
    dtype = compute_dtype(x.dtype, xp)
    rows, num_local = x.shape
    shard = plan.shard
    num_classes = _num_classes(num_local, shard)
    w_local = local_weight(weight, shard, x, xp)
    blocks = _blocks(rows, plan.block_rows)
    x_bar = _Output(x, dtype, blocks, plan.in_place, xp, scratch=False, overwrite=overwrite)
    single = len(blocks) == 1
    t_bar: Array = None if single or not target_grad else xp.empty(target.shape, dtype=target.dtype, device=device(x))
    g: Array = None
    for a, b in blocks:
        x_blk, t_blk, ce_bar_blk = _rows(x, a, b), _rows(target, a, b), _rows(ce_bar, a, b)
        tg = None
        if stats is None or target_grad:
            # the target's gradient needs s, which an in-place exp would overwrite
            scratch = None if target_grad else x_bar.scratch(a, b)
            reuse = x_bar.fresh and not target_grad
            blk = _forward_block(
                x_blk,
                t_blk,
                weight,
                opts,
                plan,
                dtype,
                xp,
                for_grad=True,
                out=scratch,
                reuse=reuse,
                tanh_out=x_bar.tanh_scratch(b - a, opts),
            )
            e, e_scale, th, targets = blk.e, 1.0 / blk.sum_e, blk.tanh, blk.targets
            if target_grad:
                tg = xp.astype(_target_grad(blk, ce_bar_blk, w_local, opts), target.dtype)
        else:
            cls = None
            if t_blk.ndim == 1:
                cls = class_targets(
                    t_blk, weight, num_classes, opts, xp, may_ignore=plan.may_ignore, shard=shard, num_local=num_local
                )
            counted = None if cls is None or plan.in_place else cls.counted
            scratch = x_bar.scratch(a, b)
            z, th = _logits_for(x_blk, scratch, counted, opts, dtype, xp, x_bar.tanh_scratch(b - a, opts))
            shift, lse_s = stats
            if x_bar.fresh and z is not x_blk:  # z is a fresh array of ours (a cast, a softcap): s goes over it
                scratch = z
            e = _exp_shifted(z, _rows(shift, a, b)[:, None], scratch, xp, x_bar.fresh)[1]()
            e_scale = xp.exp(-_rows(lse_s, a, b))  # softmax = e·e_scale
            targets = cls if cls is not None else _smoothed(xp.astype(t_blk, dtype), num_classes, opts, w_local)
        lse_bar_blk = None if lse_bar is None else _rows(lse_bar, a, b)
        g = _grad_block(
            e, e_scale, th, targets, weight, ce_bar_blk, lse_bar_blk, opts, plan.in_place, xp, x_bar.dest(a, b), shard
        )
        g = x_bar.put(a, b, g)
        if single:
            return g, tg
        if tg is not None:
            t_bar = xpx.at(t_bar)[a:b, ...].set(tg)
    return g, t_bar


def row_losses_and_grad(
    x: Array,
    target: Array,
    weight: Array | None,
    ce_scale: Array | float,
    lse_scale: Array | float,
    opts: Options,
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
    dtype = compute_dtype(x.dtype, xp)
    blocks = _blocks(x.shape[0], plan.block_rows)
    x_bar = _Output(x, dtype, blocks, plan.in_place, xp, scratch=True, overwrite=overwrite)
    ces, lses = [], []
    g: Array = None
    for a, b in blocks:
        out, t_blk = x_bar.scratch(a, b), _rows(target, a, b)
        blk = _forward_block(
            _rows(x, a, b),
            t_blk,
            weight,
            opts,
            plan,
            dtype,
            xp,
            for_grad=True,
            out=out,
            reuse=x_bar.fresh,
            tanh_out=x_bar.tanh_scratch(b - a, opts),
            need_lse=need_lse or _nonzero(lse_scale),
        )
        ce_bar = full_like(blk.ce, ce_scale, xp) if isinstance(ce_scale, float) else xp.zeros_like(blk.ce) + ce_scale
        lse_bar = lse_scale * blk.lse if _nonzero(lse_scale) and blk.lse is not None else None
        e_scale = blk.sum_e**-1.0  # one operation; 1.0 / sum_e is two in torch (reciprocal, then a product)
        g = _grad_block(
            blk.e,
            e_scale,
            blk.tanh,
            blk.targets,
            weight,
            ce_bar,
            lse_bar,
            opts,
            plan.in_place,
            xp,
            x_bar.dest(a, b),
            plan.shard,
        )
        g = x_bar.put(a, b, g)
        ces.append(blk.ce)
        lses.append(blk.lse)
    if len(blocks) == 1:
        return ces[0], lses[0], g
    return xp.concat(ces), None if lses[0] is None else xp.concat(lses), g


def row_losses_jvp(
    x: Array,
    target: Array,
    weight: Array | None,
    x_dot: Array | None,
    target_dot: Array | None,
    opts: Options,
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
    w_local = local_weight(weight, shard, x, xp)
    blk = _forward_block(x, target, weight, opts, plan, compute_dtype(x.dtype, xp), xp, for_grad=True)
    ones, zeros = xp.ones_like(blk.ce), xp.zeros_like(blk.ce)
    ce_dot, lse_dot = zeros, zeros
    if x_dot is not None:
        if blk.tanh is not None:  # the tangent through the softcap, ẋ·(1 - tanh²), with tanh recomputed (of -x/s):
            # XLA then neither merges it with the forward's tanh(x/s) nor keeps that one for two consumers
            counted = blk.targets.counted if isinstance(blk.targets, _ClassTargets) else None
            th = xp.tanh(-prepare_logits(x, counted, Options(), blk.e.dtype, xp)[0] / opts.softcap)
            x_dot = x_dot * (1.0 - th * th)
        # the tangent as products by per-row factors after the class sums, and the target term as a gather:
        # reverse mode transposes them to one product of e by a per-row factor and a scatter (optax's form)
        e_scale = xp.exp(-blk.lse_s)
        r, d, a = _grad_terms(e_scale, blk.targets, weight, ones, None, opts, xp, blk.e, shard)
        e_dot = xp.sum(blk.e * x_dot, axis=-1)
        ce_dot = r * e_dot
        if d is not None:
            ce_dot = ce_dot - xp.sum(d * x_dot, axis=-1)
        if a is not None:
            ce_dot = ce_dot - a * gather_rows(x_dot, blk.targets.index, xp)
        lse_dot = e_scale * e_dot
    if target_dot is not None:
        ce_dot = ce_dot + xp.sum(_target_grad(blk, ones, w_local, opts) * target_dot, axis=-1)
    if weight_dot is not None:
        w_dot = local_weight(weight_dot, shard, x, xp)
        ce_dot = ce_dot + xp.sum(_weight_coefs(blk, target, opts, xp, shard) * w_dot, axis=-1)
    if x_dot is not None or target_dot is not None or weight_dot is not None:
        ce_dot, lse_dot = _group_sums(shard, xp, ce_dot, lse_dot)
    return blk.ce, blk.lse, ce_dot, lse_dot


# --------------------------------------------------------------------------
# Execution: blocks of rows and in-place updates (Plan.block_rows, Plan.in_place)
#
# The formulas above call these; they change where results are written, never
# what is computed. They stay in this module (not a separate _eager layer)
# because the row functions above interleave them with the formulas within a
# block (exp(s) written into a buffer between the forward's sums and the
# gradient's products): a split would need a second copy of each row function.

#: Elements per block of rows processed at once by eager backends (16 MiB of
#: float32). Each block is computed in place in few operations, in a buffer
#: reused across blocks, and across calls too: glibc serves allocations below
#: its 32 MiB mmap threshold from the heap, while larger ones are fresh pages
#: every call (a 64 MiB buffer cost torch 13 ms of page faults per call). Few,
#: large operations also matter to torch on a busy machine: each of its
#: multithreaded operations synchronises its threads once, and with 2**20-element
#: blocks a competing process made the forward 6x slower than F.cross_entropy.
BLOCK_ELEMENTS = 2**22


def _in_buffer(z: Array, out: Array | None) -> Array:
    """``z`` narrower than ``out`` (bfloat16 logits) cast as it is copied into ``out``; else ``z``.

    In place only (NumPy, torch): setitem casts, where array-api-extra's at()
    would astype a copy first; torch's mixed-dtype subtraction is ten times
    slower than a copy, and its bfloat16 max three times slower than float32's.
    """
    if out is None or z is out or z.dtype == out.dtype:
        return z
    out[...] = z
    return out


def _exp_shifted(z: Array, m: Array, out: Array | None, xp: Namespace, reuse: bool = False) -> tuple[Array, Array]:
    """``s = z - m`` and a function giving ``exp(s)``, both in ``out`` when it is given
    (``reuse``: ``exp(s)`` over the fresh ``s``)."""
    if out is None:
        s = z - m
        return s, (lambda: exp(s, xp, out=s)) if reuse else (lambda: exp(s, xp))
    s = xp.subtract(_in_buffer(z, out), m, out=out)
    return s, lambda: exp(s, xp, out=s)


def _logits_for(
    x: Array,
    out: Array | None,
    counted: Array | None,
    opts: Options,
    dtype: Any,
    xp: Namespace,
    tanh_out: Array | None = None,
) -> Any:
    """:func:`prepare_logits`, except that logits going into ``out`` are computed there: unchanged ones
    are cast there, softcapped ones are ``s·tanh(x/s)`` written there (``tanh`` kept in ``tanh_out``
    when given, else not kept: a forward alone), with no block-sized temporary."""
    if out is None or counted is not None:
        return prepare_logits(x, counted, opts, dtype, xp)
    cap = opts.softcap
    if cap is None:
        return x, None
    th = out if tanh_out is None else tanh_out
    th = xp.tanh(xp.divide(_in_buffer(x, th), cap, out=th), out=th)
    return xp.multiply(th, cap, out=out), None if tanh_out is None else th


def _times(a: Array, b: Array, in_place: bool, out: Array | None = None, xp: Namespace = None) -> Array:
    """``a · b``, written into ``out`` when given, else updating ``a`` when in place."""
    if out is not None:
        return xp.multiply(a, b, out=out)
    if in_place:
        a *= b
        return a
    return a * b


def _minus(a: Array, b: Array, in_place: bool) -> Array:
    """``a - b``, updating ``a`` when in place."""
    if in_place:
        a -= b
        return a
    return a - b


def _subtract_at(g: Array, index: Array, values: Array, in_place: bool, xp: Namespace) -> Array:
    """``g[i, index[i]] -= values[i]`` for every row ``i``."""
    return subtract_at_rows(g, index, values, xp) if in_place else subtract_at_rows_copy(g, index, values, xp)


def _one_block(x: Array, plan: Plan) -> bool:
    """Whether the rows of ``x`` are one block of ``plan``."""
    return plan.block_rows is None or x.shape[0] <= plan.block_rows


def _blocks(rows: int, block_rows: int | None) -> list[tuple[int, int]]:
    if block_rows is None:  # one block (lazy arrays: ``rows`` may be dask's NaN, a size unknown until computed)
        return [(0, rows)]
    step = rows if block_rows >= rows else max(1, block_rows)
    return [(a, min(a + step, rows)) for a in range(0, max(rows, 1), max(step, 1))]


def _rows(a: Array, start: int, stop: int) -> Array:
    """Rows ``[start, stop)`` of ``a``; ``a`` itself when that is all of them (torch's
    legacy vmap, behind ``is_grads_batched``, cannot batch a full slice's alias). ``not stop < rows``:
    ``stop == rows``, and true for dask's NaN (all of a lazy array's rows, their number unknown)."""
    return a if start == 0 and not stop < a.shape[0] else a[start:stop, ...]


def block_rows_for(num_classes: int) -> int:
    """Rows per block for eager backends (see :data:`BLOCK_ELEMENTS`)."""
    return max(1, BLOCK_ELEMENTS // max(num_classes, 1))


class _Output:
    """The ``(rows, C)`` gradient, written block by block.

    In place (``in_place``), each block's ``exp(s)`` is computed straight
    in the block's slice of the result, or with ``scratch`` in one reused
    cache-sized buffer whose product with the row coefficients then writes the
    slice (one block more memory; faster on NumPy, where the forward's sum
    runs between the two). A compute dtype wider than the result's always
    takes the buffer and is cast in. With ``overwrite`` (the logits are a
    temporary of the caller's) the gradient is computed over the logits.
    One block (``fresh``), in place and without ``overwrite``: neither, the
    block's ``exp(s)`` is computed over its fresh ``s`` and becomes the result.
    """

    def __init__(
        self,
        like: Array,
        dtype: Any,
        blocks: list[tuple[int, int]],
        in_place: bool,
        xp: Namespace,
        *,
        scratch: bool,
        overwrite: bool = False,
    ):
        self.xp, self.dtype, self.in_place = xp, like.dtype, in_place
        self.like, self.compute, self.rows, self.tanh = like, dtype, max(b - a for a, b in blocks), None
        self.fresh = in_place and len(blocks) == 1 and not overwrite
        self.direct = in_place and dtype == like.dtype and not self.fresh
        overwrite = overwrite and self.direct
        self.array: Array = None
        if overwrite:
            self.array = like
        elif self.direct or len(blocks) > 1:
            self.array = xp.empty(like.shape, dtype=like.dtype, device=device(like))
        self.buffer: Array = None
        if in_place and not overwrite and not self.fresh and (scratch or not self.direct):
            rows = max(b - a for a, b in blocks)
            self.buffer = xp.empty((rows, like.shape[-1]), dtype=dtype, device=device(like))

    def scratch(self, a: int, b: int) -> Array | None:
        """Where block ``[a, b)``'s ``exp(s)`` is computed (None: a new array)."""
        if self.buffer is not None:
            return _rows(self.buffer, 0, b - a)
        return _rows(self.array, a, b) if self.direct else None

    def tanh_scratch(self, rows: int, opts: Options) -> Array | None:
        """Where a block of ``rows`` keeps ``tanh(x/softcap)`` (None: a new array): one buffer for
        every block, in place with softcap (the block's temporaries would fragment the heap)."""
        if opts.softcap is None or not self.in_place or self.fresh:
            return None
        if self.tanh is None:
            shape = (self.rows, self.like.shape[-1])
            self.tanh = self.xp.empty(shape, dtype=self.compute, device=device(self.like))
        return _rows(self.tanh, 0, rows)

    def dest(self, a: int, b: int) -> Array | None:
        """Where block ``[a, b)``'s gradient is written by its first product (None: anywhere)."""
        return _rows(self.array, a, b) if self.direct else None

    def put(self, a: int, b: int, g: Array) -> Array:
        """Store block ``[a, b)`` (already there when direct); returns the output so far."""
        if self.direct:
            return self.array
        if self.array is None:
            return self.xp.astype(g, self.dtype, copy=False)
        if self.in_place:  # setitem casts (array-api-extra's at() would astype a copy first)
            self.array[a:b, ...] = g
            return self.array
        self.array = xpx.at(self.array)[a:b, ...].set(self.xp.astype(g, self.dtype, copy=False))
        return self.array
