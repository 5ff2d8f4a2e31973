"""The formulas run over blocks of rows, in place: NumPy and torch eager on the CPU.

Chosen by the adapters through their plan (``Plan.in_place``: arrays may be written and the
namespace's functions take ``out=``; never while autodiff records). Each block's ``exp(z - m)``
is written into a reused buffer, straight into its slice of the gradient, or over the block's
fresh ``s``, and updated there; the target's entry is one scatter instead of a one-hot ``where``.
Fewer, larger operations: no block-sized temporaries, fewer passes. This module changes where
results are written, never what is computed (:mod:`multixent._formulas`); its block size is a
measured assumption about CPUs, stated once in :data:`BLOCK_ELEMENTS`, and a faster exponential
for a framework's arrays comes from its adapter (``Plan.exp_into``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from . import _formulas as F
from . import _fused
from ._compat import device, row_max, row_sum, subtract_at_rows

Array = Any
Namespace = Any

#: Elements per block of rows (16 MiB of float32). A measured assumption about CPUs, not part of the
#: math: few large in-place operations on a block that stays in the allocator's reused heap beat
#: many small ones or page-faulting fresh memory per call. ``nox -s bench`` measures it (the
#: in-process ratios at 4096 x 32000 against the native loss); benchmarks/results/ records the figures.
BLOCK_ELEMENTS = 2**22


def exp_into(s: Array, plan: Any, xp: Namespace) -> Array:
    """``exp(s)`` over ``s``: the adapter's in-place exponential where its plan has one (a faster route on
    its hardware, :attr:`multixent._rows.Plan.exp_into`), else the namespace's."""
    return xp.exp(s, out=s) if plan.exp_into is None else plan.exp_into(s)


def block_rows_for(num_classes: int) -> int:
    """Rows per block for eager backends on the CPU (see :data:`BLOCK_ELEMENTS`)."""
    return max(1, BLOCK_ELEMENTS // max(num_classes, 1))


def blocks(rows: int, block_rows: int | None) -> list[tuple[int, int]]:
    """The ``[start, stop)`` row ranges of the blocks (one without ``block_rows``)."""
    if block_rows is None:  # one block (lazy arrays: ``rows`` may be dask's NaN, a size unknown until computed)
        return [(0, rows)]
    step = rows if block_rows >= rows else max(1, block_rows)
    return [(a, min(a + step, rows)) for a in range(0, max(rows, 1), max(step, 1))]


def rows_of(a: Array, start: int, stop: int) -> Array:
    """Rows ``[start, stop)`` of ``a``; ``a`` itself when that is all of them (torch's
    legacy vmap, behind ``is_grads_batched``, cannot batch a full slice's alias). ``not stop < rows``:
    ``stop == rows``, and true for dask's NaN (all of a lazy array's rows, their number unknown)."""
    return a if start == 0 and not stop < a.shape[0] else a[start:stop, ...]


def _into(z: Array, out: Array | None) -> Array:
    """``z`` narrower than ``out`` (bfloat16 logits) cast as it is copied into ``out``; else ``z``.

    setitem casts, where array-api-extra's at() would astype a copy first, and a mixed-dtype
    subtraction or a bfloat16 max is slower than a copy and the float32 one (torch).
    """
    if out is None or z is out or z.dtype == out.dtype:
        return z
    out[...] = z
    return out


def _logits_into(
    x: Array, out: Array | None, opts: F.Options, dtype: Any, xp: Namespace, tanh_out: Array | None = None
) -> tuple[Array, Array | None]:
    """:func:`multixent._formulas.prepare_logits` (no row masked) with logits going into ``out`` computed there:
    unchanged ones are cast there, softcapped ones are ``s·tanh(x/s)`` written there (``tanh`` kept in
    ``tanh_out`` when given, else not kept: a forward alone), with no block-sized temporary."""
    if out is None:
        return F.prepare_logits(x, None, opts, dtype, xp)
    cap = opts.softcap
    if cap is None:
        return x, None
    th = out if tanh_out is None else tanh_out
    th = xp.tanh(xp.divide(_into(x, th), cap, out=th), out=th)
    return xp.multiply(th, cap, out=out), None if tanh_out is None else th


def _logits_in(
    x: Array, out: Array | None, opts: F.Options, dtype: Any, xp: Namespace, tanh_out: Array | None
) -> tuple[Array, Array | None, Array | None]:
    """``(z, out, tanh)``: the logits ``z`` (:func:`_logits_into`, in ``out`` when given) and where
    ``s = z - m`` goes: ``out``, else over ``z`` when it is a fresh array of ours (a cast, a
    softcap), else (None) a new array."""
    z, th = _logits_into(x, out, opts, dtype, xp, tanh_out)
    z = _into(z, out)
    return z, (z if out is None and z is not x else out), th


def forward(
    x: Array,
    target: Array,
    weight: Array | None,
    opts: F.Options,
    plan: Any,
    dtype: Any,
    xp: Namespace,
    *,
    out: Array | None,
    tanh_out: Array | None = None,
    need_lse: bool = True,
) -> _fused.Forward:
    """The loss of one block, ``exp(s)`` written into ``out`` (which may be ``x``), or over ``s``, a
    fresh array, without one; ``s_y`` and the smoothing sum are read from ``s`` before ``exp(s)``
    overwrites it. ``tanh_out``: where ``tanh(x/softcap)`` is kept for the gradient."""
    shard = plan.shard
    targets = _fused.targets_of(x, target, weight, opts, plan, dtype, xp)
    z, out, th = _logits_in(x, out, opts, dtype, xp, tanh_out)
    top = row_max(z, xp) if z is out else F.prepare_logits(row_max(x, xp), None, opts, dtype, xp)[0]
    m = _fused.shift(top, plan, xp)
    s = z - m if out is None else xp.subtract(z, m, out=out)
    if not isinstance(targets, F.ClassTargets):
        tws = F.weighted_target_sum(targets, s, xp)
        e = exp_into(s, plan, xp)
        sum_e, tws, tw_sum = F.group_sums(shard, xp, row_sum(e, xp), tws, row_sum(targets, xp))
        lse_s = xp.log(sum_e)
        lse = lse_s + m[:, 0] if need_lse else None
        return _fused.Forward(F.probability_loss(lse_s, tw_sum, tws), lse, None, m, sum_e, lse_s, e, th, targets)
    s_y = F.gather_rows(s, targets.index, xp)
    if targets.here is not None:  # the target's term: from the one shard holding it
        s_y = xp.where(targets.here, s_y, 0.0)
    smooth_sum = w_sum = None
    if F.may_be_nonzero(opts.label_smoothing):
        smooth_sum = F.row_sum_weighted(s, F.local_weight(weight, shard, x, xp), xp)
        w_sum = F.weight_sum(weight, F.num_classes(x.shape[-1], shard), xp)
    e = exp_into(s, plan, xp)
    sum_e, s_y, smooth_sum = F.group_sums(shard, xp, row_sum(e, xp), s_y, smooth_sum)
    num_classes = F.num_classes(x.shape[-1], shard)
    ce, lse, lse_s = F.index_rows(sum_e, s_y, smooth_sum, m, targets, opts, num_classes, w_sum, xp, need_lse)
    return _fused.Forward(ce, lse, None, m, sum_e, lse_s, e, th, targets)


def from_stats(
    x: Array,
    target: Array,
    weight: Array | None,
    stats: tuple[Array, Array],
    opts: F.Options,
    plan: Any,
    xp: Namespace,
    *,
    out: Array | None,
    tanh_out: Array | None,
) -> tuple[Array, Array, Array | None, Any]:
    """:func:`multixent._fused.from_stats` with ``e`` written into ``out``, or over ``s``, a fresh array."""
    dtype = F.compute_dtype(x.dtype, xp)
    targets = _fused.targets_of(x, target, weight, opts, plan, dtype, xp)
    z, out, th = _logits_in(x, out, opts, dtype, xp, tanh_out)
    m, lse_s = stats
    s = z - m[:, None] if out is None else xp.subtract(z, m[:, None], out=out)
    return exp_into(s, plan, xp), xp.exp(lse_s), th, targets


def forwards(
    x: Array,
    target: Array,
    weight: Array | None,
    opts: F.Options,
    plan: Any,
    xp: Namespace,
    *,
    overwrite: bool,
    need_lse: bool,
) -> Iterator[_fused.Forward]:
    """:func:`forward` of each block: ``exp(s)`` over the block's logits (``overwrite``: ``x`` is a
    temporary of the caller's), or in one block-sized buffer reused by every block; one block: over
    its fresh ``s``, no buffer."""
    dtype = F.compute_dtype(x.dtype, xp)
    in_x = overwrite and x.dtype == dtype
    spans = blocks(x.shape[0], plan.block_rows)
    buffer: Array = None
    if len(spans) > 1 and not in_x:
        buffer = xp.empty((max(b - a for a, b in spans), x.shape[-1]), dtype=dtype, device=device(x))
    for a, b in spans:
        out = rows_of(x, a, b) if in_x else None if buffer is None else rows_of(buffer, 0, b - a)
        yield forward(
            rows_of(x, a, b), rows_of(target, a, b), weight, opts, plan, dtype, xp, out=out, need_lse=need_lse
        )


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
    out: Array | None = None,
    shard: F.Shard | None = None,
) -> Array:
    """:func:`multixent._fused.gradient` written into ``out``, or over ``e``; the ignored rows' gradient
    is zeroed at the end (in place, their logits were not zeroed: their NaN or inf ends here)."""
    r, d, a = F.grad_terms(sum_e, targets, weight, ce_bar, lse_bar, opts, xp, e, shard)
    if out is None:
        e *= r[:, None]
        g = e
    else:
        g = xp.multiply(e, r[:, None], out=out)
    if d is not None:
        g -= d
    if a is not None and g.shape[-1]:  # (no class here: no target either)
        g = subtract_at_rows(g, targets.index, a, xp)
    if th is not None:  # 1 - tanh² over tanh (the block's own): no temporary
        th *= th
        th *= -1.0
        th += 1.0
        g *= th
    if isinstance(targets, F.ClassTargets) and targets.counted is not None:
        g[~targets.counted, ...] = 0.0
    return g


class Output:
    """The ``(rows, C)`` gradient, written block by block, in place.

    Each block's ``exp(s)`` is computed straight in the block's slice of the result (``direct``),
    or with ``scratch`` in one reused block-sized buffer whose product with the row coefficients
    then writes the slice (one block more memory; faster on NumPy, where the forward's sum runs
    between the two). A compute dtype wider than the result's always takes the buffer and is cast
    in. With ``overwrite`` (the logits are a temporary of the caller's) the gradient is computed
    over the logits. One block (``fresh``) without ``overwrite``: neither, the block's ``exp(s)`` is
    computed over its fresh ``s`` and becomes the result.
    """

    def __init__(
        self, like: Array, dtype: Any, spans: list[tuple[int, int]], xp: Namespace, *, scratch: bool, overwrite: bool
    ):
        self.xp, self.like, self.compute, self.tanh = xp, like, dtype, None
        self.rows = max(b - a for a, b in spans)
        self.fresh = len(spans) == 1 and not overwrite
        self.direct = dtype == like.dtype and not self.fresh
        self.array: Array = None
        if overwrite and self.direct:
            self.array = like
        elif self.direct or len(spans) > 1:
            self.array = xp.empty(like.shape, dtype=like.dtype, device=device(like))
        self.buffer: Array = None
        if self.array is not like and not self.fresh and (scratch or not self.direct):
            self.buffer = xp.empty((self.rows, like.shape[-1]), dtype=dtype, device=device(like))

    def scratch(self, a: int, b: int) -> Array | None:
        """Where block ``[a, b)``'s ``exp(s)`` is computed (None: over its fresh ``s``)."""
        if self.buffer is not None:
            return rows_of(self.buffer, 0, b - a)
        return rows_of(self.array, a, b) if self.direct else None

    def tanh_scratch(self, rows: int, opts: F.Options) -> Array | None:
        """Where a block of ``rows`` keeps ``tanh(x/softcap)`` (None: a new array): one buffer for
        every block, with softcap (the block's temporaries would fragment the heap)."""
        if opts.softcap is None or self.fresh:
            return None
        if self.tanh is None:
            self.tanh = self.xp.empty((self.rows, self.like.shape[-1]), dtype=self.compute, device=device(self.like))
        return rows_of(self.tanh, 0, rows)

    def dest(self, a: int, b: int) -> Array | None:
        """Where block ``[a, b)``'s gradient is written by its first product (None: over ``e``)."""
        return rows_of(self.array, a, b) if self.direct else None

    def put(self, a: int, b: int, g: Array) -> Array:
        """Store block ``[a, b)`` (already there when direct); returns the output so far."""
        if self.direct:
            return self.array
        if self.array is None:
            return self.xp.astype(g, self.like.dtype, copy=False)
        self.array[a:b, ...] = g  # setitem casts (array-api-extra's at() would astype a copy first)
        return self.array
