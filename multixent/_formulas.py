"""What the cross-entropy computes: its formulas, out of place, on any array-API namespace ``xp``.

Every function here is an equation (in its docstring) over whole arrays; none writes into an array,
holds a buffer or knows a block size. How they run is chosen by the adapters (their
:class:`multixent._rows.Plan`): :mod:`multixent._fused` evaluates each pass as one out-of-place
expression over the rows (compilers, transforms, lazy arrays, accelerators) and :mod:`multixent._blocked`
runs them over blocks of rows in place (NumPy and torch eager on the CPU).

Per row of 2-D ``(rows, C)`` logits ``z``, with ``s = z - m`` shifted by the (finite) row max ``m``,
``lse_s = log Σ_c exp(s_c)``, smoothing ``ε`` and class weights ``w``::

    class index y:      ce = (1-ε) w_y (lse_s - s_y) + ε/C Σ_c w_c (lse_s - s_c)
    probabilities t:    ce = Σ_c t'_c w_c (lse_s - s_c),   t' = (1-ε) t + ε/C
    and                 lse = lse_s + m;   z-loss: c·lse²;   softcap s: z ← s·tanh(z/s)

The gradient has the closed form::

    ∂ce/∂z = softmax(z) · Σ_c a_c - a,   ∂lse/∂z = softmax(z)

with ``a`` the weighted target distribution (``a_c = (1-ε) w_y [c=y] + ε/C w_c`` or ``t'_c w_c``),
times ``1 - tanh²(x/s)`` under ``softcap=s``; and with respect to the class weights::

    class index y:      ∂ce/∂w_c = (1-ε) [c=y] (lse_s - s_y) + ε/C (lse_s - s_c)
    probabilities t:    ∂ce/∂w_c = t'_c (lse_s - s_c)

With the class axis split over a group (:class:`Shard`), each member holds ``C_local``
consecutive classes: the row max and the class sums (``Σ_c exp(s_c)``, the target's logit,
``Σ_c w_c z_c``, ``Σ_c t'_c w_c s_c``, ``Σ_c t'_c w_c``) are reduced over the member's classes,
then across the group (``Shard.max``, ``Shard.sum``: a few ``(rows,)`` vectors, never the
logits); ``C`` and the weights' sums are global, and the gradient is local once ``lse`` is known.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._compat import Memo, clip, device, float_bits, max_along, take, take_rows, zero_nan

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


def may_be_nonzero(coefficient: float | Array) -> bool:
    """Whether a coefficient's term (label smoothing, z-loss) is computed: a nonzero float, or an
    array (its value unknown, maybe 0)."""
    return not isinstance(coefficient, float) or coefficient != 0.0


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


def group_max(a: Array, shard: Shard | None) -> Array:
    """``a``'s maximum across the group (``a`` itself without one)."""
    return a if shard is None else shard.max(a)


def group_sums(shard: Shard | None, xp: Namespace, *values: Array | None) -> tuple[Array, ...]:
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


def num_classes(num_local: int, shard: Shard | None) -> int:
    """The global number of classes ``C``."""
    return num_local if shard is None else shard.num_classes


def local_weight(weight: Array | None, shard: Shard | None, x: Array, xp: Namespace) -> Array | None:
    """The member's slice of the full ``(C,)`` class weights, for its ``(rows, C_local)`` logits ``x``."""
    if weight is None or shard is None:
        return weight
    return xp.take(weight, shard.offset() + xp.arange(x.shape[-1], device=device(x)))


# --------------------------------------------------------------------------
# The shift and logsumexp


#: Per ``(namespace, dtype)``: the compute dtype and its largest finite value.
_COMPUTE: Memo[tuple[Any, float]] = Memo()


def _compute(dtype: Any, xp: Namespace) -> tuple[Any, float]:
    def compute() -> tuple[Any, float]:
        wide = xp.float32 if float_bits(dtype, xp) < 32 else dtype
        return wide, float(xp.finfo(wide).max)

    return _COMPUTE((xp, dtype), compute)


def compute_dtype(dtype: Any, xp: Namespace) -> Any:
    """float16/bfloat16 are computed in float32; wider floats as they are."""
    return _compute(dtype, xp)[0]


def finite_shift(top: Array, xp: Namespace) -> Array:
    """``m = clip(top, -max, max)``: the row max ``top`` clipped to the finite range, the shift of ``s = z - m``.

    Finite maxima are unchanged; a ``±inf`` one becomes ``±max``, which gives the results
    of SciPy's rule (shift by 0 where the max is not finite): ``+inf`` entries stay ``+inf``,
    finite ones underflow to ``exp = 0``, a row of ``-inf`` gives ``log 0 = -inf``; NaN stays.
    One operation, where ``where(isfinite(top), top, 0)`` is up to six (torch).
    """
    big = _compute(top.dtype, xp)[1]
    return clip(top, -big, big, xp)


def shift_and_log1p(x: Array, axis: int, xp: Namespace, shard: Shard | None = None) -> tuple[Array, Array]:
    """``(m, L)`` (keepdims) with ``logsumexp(x) = m + L``, as SciPy's ``logsumexp``::

        m = max(x) where finite, else 0;   L = log1p(Σ_{i≠k} exp(x_i - m))

    with ``k`` one maximal entry (the other maxima add 1 each): the dominant term is kept out
    of the sum, so ``logsumexp([0, -40])`` is ``exp(-40)``, not 0. Where the max is ±inf
    or NaN, ``L`` is that max (the naive formula's value). A maximal entry adds
    ``exp(x_k - m) - 1``: exactly 0, with the derivative of its exponential, so
    the gradient is the softmax even where ``m`` is not differentiated (a ``shard``'s
    max). With a ``shard`` the max and sums span the group.
    """
    top = group_max(max_along(x, axis, xp), shard)
    finite = xp.isfinite(top)
    m = xp.where(finite, top, 0.0)
    is_top = x == top
    rest = xp.sum(xp.exp(x - m) - xp.astype(is_top, x.dtype), axis=axis, keepdims=True)
    ties = xp.sum(xp.astype(is_top, x.dtype), axis=axis, keepdims=True)
    if shard is not None:
        rest, ties = group_sums(shard, xp, rest, ties)
    return m, xp.where(finite, xp.log1p((ties - 1.0) + rest), top)


def logsumexp(x: Array, /, *, axis: int, keepdims: bool, xp: Namespace, shard: Shard | None = None) -> Array:
    """``log Σ exp(x) = m + L`` along ``axis`` (:func:`shift_and_log1p`); ``-inf`` for an empty axis."""
    z = xp.astype(x, compute_dtype(x.dtype, xp), copy=False)
    m, log1p_rest = shift_and_log1p(z, axis, xp, shard)
    out = xp.astype(m + log1p_rest, x.dtype, copy=False)
    return out if keepdims else xp.squeeze(out, axis=axis)


def log_softmax(x: Array, /, *, axis: int, xp: Namespace, shard: Shard | None = None) -> Array:
    """``x - logsumexp(x) = (x - m) - L`` along ``axis`` (:func:`shift_and_log1p`)."""
    z = xp.astype(x, compute_dtype(x.dtype, xp), copy=False)
    m, log1p_rest = shift_and_log1p(z, axis, xp, shard)
    if shard is not None:
        log1p_rest = shard.spread(log1p_rest)
    return xp.astype((z - m) - log1p_rest, x.dtype, copy=False)


# --------------------------------------------------------------------------
# The targets, the softcap


@dataclass
class ClassTargets:
    """Class-index targets of some rows: which rows count, and their weights."""

    index: Array  # (n,) clipped into [0, C)
    counted: Array | None  # (n,) bool: not ignore_index (None: every row)
    out_of_range: Array | None  # (n,) bool: counted but out of [0, C): their loss is NaN (None: no row)
    weight_at_target: Array | float  # (n,) w_y, or 1.0
    here: Array | None = None  # (n,) bool: y is among this shard's classes (None: unsharded); index is local

    def zero_ignored(self, values: Array, xp: Namespace) -> Array:
        """``values`` on counted rows, 0 on ignored ones."""
        return values if self.counted is None else xp.where(self.counted, values, 0.0)

    def nan_out_of_range(self, values: Array, xp: Namespace) -> Array:
        """``values``, NaN on rows whose class index is out of range (the traced path's answer to an
        index it cannot raise for)."""
        return values if self.out_of_range is None else xp.where(self.out_of_range, math.nan, values)

    def row_values(self, values: Array, xp: Namespace) -> Array:
        """Per-row results: 0 where ignored (:meth:`zero_ignored`), NaN where out of range
        (:meth:`nan_out_of_range`)."""
        return self.nan_out_of_range(self.zero_ignored(values, xp), xp)


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
    assert_none: Callable[[Array, str], bool] | None = None,
) -> ClassTargets:
    """The rows' classes and weights ``w_y``; ``may_ignore=False``: the indices were checked (none ignored).

    ``num_classes`` is the global C and ``weight`` the full ``(C,)``; with a ``shard`` of
    ``num_local`` classes, ``index`` is the local one (0 where ``y`` is on another shard).
    ``index`` is ``y`` clipped into ``[0, C)``: a counted row whose clipped index differs is out of range.
    ``assert_none``: the adapter's device-side assertion (:attr:`multixent._rows.Plan.assert_none`), given
    those rows; where it asserts that there are none, no row's loss is made NaN for them.
    """
    if may_ignore:
        counted = target != opts.ignore_index
        index = clip(target, 0, max(num_classes - 1, 0), xp)
        out_of_range = counted & (index != target)
        if assert_none is not None and assert_none(out_of_range, OUT_OF_RANGE):
            out_of_range = None
    else:  # checked concretely: every row counts and is in range
        index, counted, out_of_range = target, None, None
    w_y = 1.0 if weight is None else take(weight, index, xp)
    here = None
    if shard is not None:
        local = index - shard.offset()
        here = (local >= 0) & (local < num_local)
        index = xp.where(here, local, 0)
    return ClassTargets(index, counted, out_of_range, w_y, here)


#: The device-side assertion's message for a class index out of range (:func:`class_targets`).
OUT_OF_RANGE = "multixent: target holds a class index outside [0, C) that is not ignore_index"


def gather_rows(x: Array, index: Array, xp: Namespace, *, one_hot: bool = False) -> Array:
    """``x[i, index[i]]`` for each row ``i`` of 2-D ``x`` (``index`` in range).

    The namespace's ``take_along_axis``; where it has none (dask), or with ``one_hot``, a one-hot
    select summed along the row: elementwise and a row reduction, so it works on lazy arrays
    chunked along either axis, and its derivative is a select, not a scatter.
    """
    if hasattr(xp, "take_along_axis") and x.shape[-1] and not one_hot:
        return take_rows(x, index, xp)
    classes = xp.arange(x.shape[-1], dtype=index.dtype, device=device(x))
    return xp.sum(xp.where(classes == index[:, None], x, 0.0), axis=-1)


def smoothed(t: Array, num_classes: int, opts: Options, weight: Array | None) -> Array:
    """``t'·w = ((1-ε) t + ε/C) · w`` for probability targets."""
    eps = opts.label_smoothing
    if may_be_nonzero(eps):
        t = t * (1.0 - eps) + eps / num_classes
    return t if weight is None else t * weight


def prepare_logits(
    x: Array, counted: Array | None, opts: Options, dtype: Any, xp: Namespace
) -> tuple[Array, Array | None]:
    """``z = s·tanh(x/s)`` (softcap ``s``; else ``x``) in the compute dtype, 0 on the ignored rows
    (``counted``; so that no NaN or inf of theirs reaches a gradient).

    Returns ``z`` and ``tanh(x/s)`` (None without softcap).
    """
    z = x if x.dtype == dtype else xp.astype(x, dtype)
    if counted is not None:
        z = xp.where(counted[:, None], z, 0.0)
    if opts.softcap is None:
        return z, None
    th = xp.tanh(z / opts.softcap)
    return opts.softcap * th, th


def softcap_factor(th: Array, xp: Namespace) -> Array:
    """``∂(s·tanh(x/s))/∂x = 1 - tanh²(x/s)``."""
    return 1.0 - th * th


def row_sum_weighted(s: Array, weight: Array | None, xp: Namespace) -> Array:
    """``Σ_c w_c s_c`` per row (``Σ_c s_c`` without weights)."""
    return xp.sum(s, axis=-1) if weight is None else xp.sum(s * weight, axis=-1)


def weighted_target_sum(tw: Array, s: Array, xp: Namespace) -> Array:
    """``Σ_c t'_c w_c s_c`` per row, taking ``0·s_c`` as 0 where ``s_c`` is infinite (a ``-inf`` logit
    where the target is 0): the products' NaN as 0, so that the derivative in ``t'_c w_c`` is ``s_c`` at
    zero targets too (autodiff through the formulas). A NaN ``s_c`` or ``t'_c`` makes the row's loss NaN
    through ``lse`` or ``Σ t'_c w_c`` anyway."""
    return xp.sum(zero_nan(tw * s, xp), axis=-1)


# --------------------------------------------------------------------------
# The row loss from the row sums


def scaled(a: Array, factor: Array | float) -> Array:
    """``factor · a``, skipping a product by a Python 1.0 (no weights, no smoothing)."""
    return a if isinstance(factor, float) and factor == 1.0 else factor * a


def plus(a: Array, b: Array | None) -> Array:
    """``a + b``; ``b`` None is 0 (an output whose gradient autograd did not materialise)."""
    return a if b is None else a + b


def weight_sum(weight: Array | None, num_classes: int, xp: Namespace) -> Array | int:
    """``Σ_c w_c`` (``C`` without weights)."""
    return num_classes if weight is None else xp.sum(weight)


def index_loss(
    lse_s: Array,
    s_y: Array,
    targets: ClassTargets,
    opts: Options,
    num_classes: int,
    smooth_sum: Array | None,
    w_sum: Array | int | None,
) -> Array:
    """``ce = (1-ε) w_y (lse_s - s_y) + ε/C (Σ_c w_c · lse_s - Σ_c w_c s_c)``, from the row sums
    ``smooth_sum = Σ_c w_c s_c`` and ``w_sum = Σ_c w_c`` (None: no smoothing)."""
    eps = opts.label_smoothing
    ce = scaled(lse_s - s_y, (1.0 - eps) * targets.weight_at_target)
    if smooth_sum is not None:
        ce = ce + eps / num_classes * (w_sum * lse_s - smooth_sum)
    return ce


def probability_loss(lse_s: Array, tw_sum: Array, tws: Array) -> Array:
    """``ce = Σ_c t'_c w_c (lse_s - s_c) = lse_s · Σ_c t'_c w_c - Σ_c t'_c w_c s_c``."""
    return lse_s * tw_sum - tws


def index_rows(
    sum_e: Array,
    s_y: Array,
    smooth_sum: Array | None,
    m: Array,
    targets: ClassTargets,
    opts: Options,
    num_classes: int,
    w_sum: Array | int | None,
    xp: Namespace,
    need_lse: bool,
) -> tuple[Array, Array | None, Array]:
    """``(ce, lse, lse_s)`` of class-index rows from their (group's) row sums: ``lse_s = log Σ_c e_c``,
    ``ce`` (:func:`index_loss`; NaN where the index is out of range, 0 where ignored) and
    ``lse = lse_s + m`` (0 where ignored; None unless ``need_lse``)."""
    lse_s = xp.log(sum_e)
    ce = targets.row_values(index_loss(lse_s, s_y, targets, opts, num_classes, smooth_sum, w_sum), xp)
    lse = targets.zero_ignored(lse_s + m[:, 0], xp) if need_lse else None
    return ce, lse, lse_s


def z_loss(lse: Array, coefficient: float | Array) -> Array:
    """``c·lse²`` per row."""
    return coefficient * lse * lse


def mean(total: Array | float, count: Array | int, xp: Namespace) -> Array | float:
    """``total / count``, and 0 (with a zero gradient) where ``count`` is 0 (an int count: the empty
    sum's ``total`` itself; a float ``total`` takes an int ``count``)."""
    if isinstance(count, int):  # known now; no rows: total is the empty sum, 0
        return total / count if count else total
    nonzero = count != 0
    return xp.where(nonzero, total, 0.0) / xp.where(nonzero, count, 1.0)


def inverse_count(count: Array | int, xp: Namespace) -> Array | float:
    """``1 / count`` of a count of rows (a whole number), and 1 where it is 0: the factor of a "mean" of per-row
    terms, whose sum over no row is 0 (:func:`mean`'s values; two operations where its guard is four)."""
    if isinstance(count, int):
        return 1.0 / max(count, 1)
    return clip(count, 1, math.inf, xp) ** -1.0


# --------------------------------------------------------------------------
# The gradients and the tangents


def grad_terms(
    sum_e: Array,
    targets: Any,
    weight: Array | None,
    ce_bar: Array,
    lse_bar: Array | None,
    opts: Options,
    xp: Namespace,
    block: Array,
    shard: Shard | None = None,
) -> tuple[Array, Array | None, Array | None]:
    """``ce_bar·∂ce/∂z + lse_bar·∂lse/∂z`` as three terms ``(r, d, a)``, from ``softmax = e / sum_e``::

        ∂ = e·r[:, None] - d,  then  ∂[i, y_i] -= a[i]      (d, a None: no such term)

    Class indices: ``r = (ce_bar·((1-ε) w_y + ε/C Σw) + lse_bar) / sum_e``, ``d = ce_bar·ε/C·w`` and
    ``a = ce_bar·(1-ε)·w_y``; probabilities (``targets`` is ``t'w``): ``r = (ce_bar·Σ t'w + lse_bar) / sum_e``,
    ``d = ce_bar·t'w``. ``block``: the ``(rows, C_local)`` logits or ``e``.
    """
    num_total = num_classes(block.shape[-1], shard)
    eps = opts.label_smoothing
    if not isinstance(targets, ClassTargets):
        (t_sum,) = group_sums(shard, xp, xp.sum(targets, axis=-1))
        return plus(ce_bar * t_sum, lse_bar) / sum_e, ce_bar[:, None] * targets, None
    ce_bar = targets.zero_ignored(ce_bar, xp)  # an ignored row's terms are 0
    lse_bar = None if lse_bar is None else targets.zero_ignored(lse_bar, xp)
    at_target = (1.0 - eps) * targets.weight_at_target
    smoothing = may_be_nonzero(eps)
    total = at_target + eps / num_total * weight_sum(weight, num_total, xp) if smoothing else at_target
    coefficient = plus(scaled(ce_bar, total), lse_bar)  # r · sum_e where in range
    r = targets.nan_out_of_range(coefficient, xp) / sum_e
    d = None
    if smoothing:
        smooth = (ce_bar * (eps / num_total))[:, None]
        d = smooth if weight is None else smooth * local_weight(weight, shard, block, xp)
    if isinstance(eps, float) and eps >= 1:
        return r, d, None
    same = not smoothing and lse_bar is None  # then total is at_target: the coefficient is a's expression
    a = coefficient if same else scaled(ce_bar, at_target)
    return r, d, a if targets.here is None else xp.where(targets.here, a, 0.0)


def target_grad(s: Array, lse_s: Array, ce_bar: Array, weight: Array | None, opts: Options) -> Array:
    """``∂ce/∂t = -(1-ε) w log_softmax(z) = -(1-ε) w (s - lse_s)``, scaled by ``ce_bar``."""
    log_p = s - lse_s[:, None]
    scale = -(1.0 - opts.label_smoothing) * ce_bar[:, None]
    return scale * log_p if weight is None else scale * weight * log_p


def weight_coefficients(
    s: Array, lse_s: Array, targets: Any, target: Array, opts: Options, xp: Namespace, shard: Shard | None = None
) -> Array:
    """``∂ce/∂w`` of each row, ``(n, C)``: ``a_c (lse_s - s_c)`` with ``a`` the unweighted target
    distribution (``(1-ε)[c=y] + ε/C``, or ``t'``); 0 where ``a_c`` is 0 and the logit is not
    finite (an ignored row's NaN, a -inf logit)."""
    num_total = num_classes(s.shape[-1], shard)
    eps = opts.label_smoothing
    if isinstance(targets, ClassTargets):
        classes = xp.arange(s.shape[-1], dtype=targets.index.dtype, device=device(s))
        at_y = classes == targets.index[:, None]
        if targets.here is not None:
            at_y = at_y & targets.here[:, None]
        a = (1.0 - eps) * xp.astype(at_y, s.dtype) + eps / num_total
        if targets.counted is not None:
            a = xp.where(targets.counted[:, None], a, 0.0)
        if targets.out_of_range is not None:
            a = xp.where(targets.out_of_range[:, None], math.nan, a)
    else:
        a = smoothed(xp.astype(target, s.dtype), num_total, opts, None)
    nlp = lse_s[:, None] - s  # -log softmax
    return a * xp.where((a == 0) & ~xp.isfinite(nlp), 0.0, nlp)


def loss_tangent(
    r: Array, d: Array | None, a: Array | None, e_dot: Array, x_dot: Array, index: Array | None, xp: Namespace
) -> Array:
    """``ce_dot = Σ_c ∂ce/∂z_c · ż_c = r · e_dot - Σ_c d_c ż_c - a · ż_y`` with ``e_dot = Σ_c e_c ż_c``
    (:func:`grad_terms`): products by per-row factors after the class sums, and the target's term a
    gather (reverse mode transposes them to one product of ``e`` by a per-row factor and a scatter,
    optax's form)."""
    ce_dot = r * e_dot
    if d is not None:
        ce_dot = ce_dot - xp.sum(d * x_dot, axis=-1)
    if a is not None:
        ce_dot = ce_dot - a * gather_rows(x_dot, index, xp)
    return ce_dot
