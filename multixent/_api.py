"""Public functions: validate, pick the namespace and adapter, reshape, reduce.

The math is in :mod:`multixent._formulas` (run by :mod:`multixent._rows`); the per-framework autodiff in
:mod:`multixent._adapters`. Nothing here names a framework.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _checks, _compat, _formulas, _linear, _rows
from ._adapters import Adapter, adapter_for, check_group, dtensor_adapter, generic, shard_for
from ._compat import device

Array = Any

_IGNORE_DEFAULT = -100


def logsumexp(
    x: Array, /, *, axis: int = -1, keepdims: bool = False, group: Any = None, class_offset: int | None = None
) -> Array:
    r"""``log Σ_i exp(x_i)`` along ``axis``, stable for large and infinite values.

    Parameters
    ----------
    x : array
        Real floating values.
    axis : int, default -1
        The axis to reduce.
    keepdims : bool, default False
        Keep the reduced axis, of size 1.
    group : str, tuple of str, torch ProcessGroup or None, default None
        ``axis`` is split over this group (see :func:`cross_entropy`); the result is the whole
        axis's, the same on every member.
    class_offset : int or None, default None
        With ``group``: this member's first position along ``axis``.

    Returns
    -------
    array
        ``x``'s shape without ``axis`` (with it, of size 1, under ``keepdims``), in ``x``'s dtype.

    Raises
    ------
    TypeError
        ``x`` not a real floating array.
    ValueError
        ``axis`` out of range.

    Notes
    -----
    SciPy's formula, with ``m`` the maximum and ``k`` one position holding it:

    .. math:: \operatorname{lse}(x) = m + \log1p\Big(\sum_{i \ne k} \exp(x_i - m)\Big)

    within 1 ulp. The shift by the maximum is applied only where that maximum is finite, so
    rows of ``-inf`` give ``-inf`` and rows holding ``+inf`` give ``+inf``; an
    empty axis gives ``-inf``. float16/bfloat16 are computed in float32.

    Examples
    --------
    >>> import numpy as np, multixent
    >>> float(multixent.logsumexp(np.array([0.0, -40.0])))
    4.248354255291589e-18
    >>> multixent.logsumexp(np.array([[1.0, np.inf], [-np.inf, -np.inf]]))
    array([ inf, -inf])
    """
    x, xp, axis, layout, shard = _one_array(x, axis, group, class_offset, "logsumexp", keepdims)
    with adapter_for(x).quiet():
        out = _formulas.logsumexp(x, axis=axis, keepdims=keepdims, xp=xp, shard=shard)
    return _lazy(out, x) if layout is None else layout.wrap(out, rows_only=True)


def log_softmax(x: Array, /, *, axis: int = -1, group: Any = None, class_offset: int | None = None) -> Array:
    r"""``x - logsumexp(x)`` along ``axis`` (an empty axis gives an empty array).

    Parameters
    ----------
    x : array
        Real floating values.
    axis : int, default -1
        The axis to normalise.
    group : str, tuple of str, torch ProcessGroup or None, default None
        ``axis`` is split over this group (see :func:`cross_entropy`): each member gets its own
        positions' log-probabilities.
    class_offset : int or None, default None
        With ``group``: this member's first position along ``axis``.

    Returns
    -------
    array
        ``x``'s shape and dtype.

    Raises
    ------
    TypeError
        ``x`` not a real floating array.
    ValueError
        ``axis`` out of range.

    Notes
    -----
    .. math:: \log\operatorname{softmax}(x)_i = x_i - \operatorname{lse}(x)

    with :func:`logsumexp`'s ``lse``. ``group``: its gradient sums every member's through the
    shared ``logsumexp``: with torch, call backward on every member.

    Examples
    --------
    >>> import numpy as np, multixent
    >>> multixent.log_softmax(np.zeros(4)).round(6)
    array([-1.386294, -1.386294, -1.386294, -1.386294])
    """
    x, xp, axis, layout, shard = _one_array(x, axis, group, class_offset, "log_softmax")
    with adapter_for(x).quiet():
        out = _formulas.log_softmax(x, axis=axis, xp=xp, shard=shard)
    return _lazy(out, x) if layout is None else layout.wrap(out, rows_only=False)


def _one_array(
    x: Array, axis: Any, group: Any, class_offset: Any, function: str, keepdims: bool = False
) -> tuple[Array, Any, int, Any, _formulas.Shard | None]:
    """``(x, xp, axis, layout, shard)`` of a ``logsumexp``/``log_softmax`` call, checked (with a group:
    on every member, through the agreement)."""
    members = _Members(group, class_offset)
    try:
        xp, _ = _checks.namespace(x, names=("x",))
        _checks.floating(x, "x", xp)
        axis = _checks.class_axis(axis, x.ndim, "x")
        x, layout = _local(x, axis, members)
    except _CHECK_ERRORS as err:  # with a group: raised on every member, none left waiting
        raise members.failed(err) from None
    shard = members.agree(
        x,
        axis,
        values=lambda: (
            ("function", function),
            ("rows", _row_count(tuple(x.shape), axis)),
            ("dtype", _dtype_name(x)),
            ("axis", axis),
            ("keepdims", int(keepdims)),
        ),
    )
    return x, xp, axis, layout, shard


#: ``(name, value)`` pairs that every member of a group must pass alike (rows, dtypes, options): exchanged
#: in the agreement, the one all-gather a ``group=`` call starts with, which raises on every member where
#: they differ. Values are ints, floats or short strings.
Agreed = tuple[tuple[str, Any], ...]

#: The errors a member's checks may raise before the agreement: with a group, every member raises them.
_CHECK_ERRORS = (TypeError, ValueError, IndexError, NotImplementedError)


class _Members:
    """A call's group as its checks see it: every entry point checks its arguments, then agrees.

    ``members = _Members(group, class_offset)``; this member's checks run in a ``try`` whose
    ``except _CHECK_ERRORS as err: raise members.failed(err) from None`` raises, with a group,
    the error on every member (none is left waiting in the agreement); then :meth:`agree` makes
    the agreement. ``group`` and ``class_offset`` may be set by the checks (a DTensor's, from its
    placements). (A ``with`` block would cost ~0.3 µs a call, 1% of a small NumPy call.)
    """

    __slots__ = ("class_offset", "group")

    def __init__(self, group: Any, class_offset: Any) -> None:
        self.group, self.class_offset = group, class_offset

    def failed(self, error: Exception) -> Exception:
        """``error`` raised on every member of the group (through the agreement's all-gather, which the
        others make too); without a group, ``error`` itself, for the caller to raise."""
        if self.group is not None:
            _checks.group(self.group, self.class_offset)
            shard_for(self.group, self.class_offset, 0, (), error=error)  # raises it on every member
        return error

    def check_weight_and_group(self, weight: Array | None, classes: int, xp: Any, *arrays_and_options: Any) -> None:
        """``weight`` of ``classes`` classes; with a group, a real vector (its length is agreed, then checked
        against the group's C: :func:`_group_classes`), and the group and whether its framework can split
        this call's class axis (``arrays_and_options``: :func:`multixent._adapters.check_group`'s)."""
        if self.group is None:
            _checks.weight(weight, classes, xp)
            return
        _checks.weight_vector(weight, xp)
        _checks.group(self.group, self.class_offset)
        check_group(self.group, *arrays_and_options)

    def agree(self, x: Array, axis: int, *others: Array | None, values: Callable[[], Agreed]) -> _formulas.Shard | None:
        """The class axis ``axis`` of ``x`` split over the group (None: not split), from the agreement;
        ``values()``: what must be the same on every member (:data:`Agreed`; computed with a group only)."""
        group, class_offset = self.group, self.class_offset
        if group is None and class_offset is None:
            return None
        _checks.group(group, class_offset)
        agreed = () if group is None else values()
        return shard_for(group, class_offset, int(x.shape[axis]), (x, *others), agreed=agreed)


def _local(x: Array, axis: int, members: _Members) -> tuple[Array, Any]:
    """``(x, None)``; for a DTensor its local shard and layout, the class axis's group and offset (from
    its placements) becoming the ``members``' (results are wrapped back)."""
    dt = dtensor_adapter(x)
    if dt is None:
        return x, None
    x, layout = dt.unwrap_one(x, axis, "x", members.group)
    members.group, members.class_offset = layout.class_group, layout.class_offset
    return x, layout


def _group_classes(shard: _formulas.Shard | None, classes: int, weight: Array | None, xp: Any) -> int:
    """The number of classes: ``classes``, or with a ``shard`` the group's (checked, with the weight's
    length against it; that length is the same on every member)."""
    if shard is None:
        return classes
    classes = _checks.num_classes((shard.num_classes,), 0)
    _checks.weight(weight, classes, xp)
    return classes


def _dtype_name(a: Array | None) -> str:
    return "none" if a is None else str(a.dtype).rsplit(".", 1)[-1]


def _weight_length(weight: Array | None) -> int:
    return -1 if weight is None else int(weight.shape[0])


def _option_value(value: Any) -> Any:
    """A float option as itself, an array option as the string "array" (its value is not read)."""
    return value if value is None or isinstance(value, (int, float)) else "array"


def _agreed_options(opts: _formulas.Options, z_coef: Any, reduction: str) -> Agreed:
    return (
        ("reduction", reduction),
        ("ignore_index", opts.ignore_index),
        ("label_smoothing", _option_value(opts.label_smoothing)),
        ("z_loss", _option_value(z_coef)),
        ("softcap", _option_value(-1.0 if opts.softcap is None else opts.softcap)),
    )


# Neither frozen nor keyword-only: a frozen dataclass's __init__ costs ~1.3 µs more a call, fourteen
# keywords ~0.6 µs more than positions (together ~5% of a 64x10 call); ``_prepare`` passes locals named as
# the fields, in their order.
@dataclass(slots=True)
class _Call:
    """One validated call, its arrays flattened to rows with the class axis last; built once, not changed."""

    xp: Any
    rows: Array  # (R, C) logits
    target: Array  # (R,) class indices or (R, C) probabilities
    weight: Array | None  # (C,) in the compute dtype
    counted: Array | None  # (R,) bool for class indices that may be ignore_index
    may_ignore: bool  # False: the class indices were checked, none is ignore_index
    batch_shape: tuple[int, ...]
    axis: int
    is_index: bool
    reduction: str
    opts: _formulas.Options
    adapter: Adapter
    shard: _formulas.Shard | None  # the class axis split over a group (its math's part); None otherwise
    layout: Any  # DTensor logits: their layout (``_adapters.dtensor.Layout``); None otherwise


def _prepare(
    x: Array,
    target: Array,
    weight: Array | None,
    axis: Any,
    reduction: str,
    parse: Callable[[], tuple[_formulas.Options, float | Array]],
    name: str,
    indices_only: str | None = None,
    group: Any = None,
    class_offset: Any = None,
    function: str = "cross_entropy",
) -> tuple[_Call, float | Array]:
    """The validated call and the z-loss coefficient; ``parse()`` gives the options and that coefficient.

    With a group, everything this member can check alone is checked before the agreement (the first
    collective), whose all-gather carries the outcome and what must be equal across the members: an
    error on one member is the same error on every member (:class:`_Members`).
    """
    adapter = adapter_for(x)
    members = _Members(group, class_offset)
    try:
        opts, z_coef = parse()
        xp, (x, target, weight), is_index = _checks.arrays(x, target, weight, name, indices_only, adapter.NUMPY_INPUTS)
        axis = _checks.class_axis(axis, x.ndim, name)
        # a DTensor's: the global C; a group member's may hold none (the group's C is checked after the agreement)
        classes = _checks.num_classes(x.shape, axis) if group is None else int(x.shape[axis])
        reduction = _checks.reduction(reduction)
        _checks.target_shape(target, x, axis, is_index)
        _checks.ignore_index(opts.ignore_index, is_index, _IGNORE_DEFAULT)
        x, target, weight, layout = _unwrap(x, target, weight, axis, is_index, name, members, opts)
        members.check_weight_and_group(weight, classes, xp, x, target, weight, opts)
    except _CHECK_ERRORS as err:  # with a group: raised on every member, none left waiting
        raise members.failed(err) from None
    shard = None
    if members.group is not None or members.class_offset is not None:  # (the usual call has neither)
        shard = members.agree(
            x,
            axis,
            target,
            weight,
            values=lambda: (
                ("function", function),
                ("rows", _row_count(tuple(x.shape), axis)),
                (f"{name} dtype", _dtype_name(x)),
                ("target dtype", _dtype_name(target)),
                ("weight length", _weight_length(weight)),
                *_agreed_options(opts, z_coef, reduction),
            ),
        )
        classes = _group_classes(shard, classes, weight, xp)
    may_ignore = is_index
    if is_index:
        flat = target if target.ndim == 1 else xp.reshape(target, (-1,))
        target, opts, may_ignore = _index_target(flat, classes, opts, adapter, xp, shard, layout)
    rows, target = _as_rows(x, target, axis, is_index, xp)
    weight = None if weight is None else xp.astype(weight, _formulas.compute_dtype(x.dtype, xp))
    counted = target != opts.ignore_index if may_ignore else None  # may_ignore: class indices only
    batch_shape = tuple(x.shape[:axis] + x.shape[axis + 1 :])
    call = _Call(
        xp,
        rows,
        target,
        weight,
        counted,
        may_ignore,
        batch_shape,
        axis,
        is_index,
        reduction,
        opts,
        adapter,
        shard,
        layout,
    )
    return call, z_coef


def _as_rows(x: Array, target: Array, axis: int, is_index: bool, xp: Any) -> tuple[Array, Array]:
    """``x`` as ``(R, C)`` rows, the class axis last, and the target's rows: class indices as they are
    (flat), probabilities ``(R, C)`` (as they are beside 2-d logits: a reshape needs sizes dask may not know)."""
    local_classes = int(x.shape[axis])
    rows = x if x.ndim == 2 and axis == 1 else xp.reshape(_move_axis(x, axis, -1, xp), (-1, local_classes))
    if is_index or rows is x:
        return rows, target
    return rows, xp.reshape(_move_axis(target, axis, -1, xp), (-1, local_classes))


def _unwrap(
    x: Array,
    target: Array,
    weight: Array | None,
    axis: int,
    is_index: bool,
    name: str,
    members: _Members,
    opts: Any,
) -> tuple[Array, Array, Array | None, Any]:
    """``(x, target, weight, None)``; DTensors as their local shards and the logits' layout (results are
    wrapped back), whose class axis's group and offset (from its placements) become the ``members``'."""
    dt = dtensor_adapter(x, target, weight)
    if dt is None:
        return x, target, weight, None
    if opts.arrays:  # their gradient would be split over the ranks (like a weight's; not summed)
        raise NotImplementedError(
            "multixent: label_smoothing or softcap as a tensor that requires grad, with DTensor logits "
            "(pass a float, or a tensor autograd does not record)"
        )
    x, target, weight, layout = dt.unwrap(x, target, weight, axis, is_index, name, members.group)
    members.group, members.class_offset = layout.class_group, layout.class_offset
    return x, target, weight, layout


def _row_count(shape: tuple[int, ...], axis: int) -> int:
    """The number of rows of logits of ``shape`` with the class axis ``axis``."""
    return math.prod(shape[:axis] + shape[axis + 1 :])


#: Per ``(namespace, device, target dtype)``: the index dtype, its ``(min, max)``, and the
#: bits of an unsigned target as wide as it (0 otherwise); only for namespaces whose default
#: dtypes are fixed (:func:`multixent._compat.fixed_defaults`).
_INDEX_DTYPES: _compat.Memo[tuple[Any, int, int, int]] = _compat.Memo()


def _index_dtype(target: Array, xp: Any) -> tuple[Any, int, int, int]:
    def compute() -> tuple[Any, int, int, int]:
        dtype = xp.__array_namespace_info__().default_dtypes(device=device(target))["indexing"]
        info, src = xp.iinfo(dtype), xp.iinfo(target.dtype)
        wrapped_bits = src.bits if src.min == 0 and src.bits >= info.bits else 0
        return dtype, int(info.min), int(info.max), wrapped_bits

    if not _compat.fixed_defaults(xp):
        return compute()
    return _INDEX_DTYPES((xp, device(target), target.dtype), compute)


def _index_target(
    target: Array,
    classes: int,
    opts: _formulas.Options,
    adapter: Adapter,
    xp: Any,
    shard: _formulas.Shard | None = None,
    layout: Any = None,
) -> tuple[Array, _formulas.Options, bool]:
    """Class indices in the default index dtype (what gathers take), checked now when concrete (an
    eager accelerator's, whose values are not read but over a group: by the formulas, on the device,
    ``Plan.assert_none``).

    Returns the indices, the options, and whether an index may be ``ignore_index`` (False
    when they were checked and none is).

    Unsigned indices as wide as that dtype wrap to negatives in the cast: concrete ones are
    reported with their true value; traced ones become an index out of range (``C``, or ``C + 1``
    when ``ignore_index`` is ``C``), whose row's loss the math makes NaN. An ``ignore_index``
    outside the index dtype matches nothing (a sentinel stands in for it).
    """
    dtype, low, high, wrapped_bits = _index_dtype(target, xp)
    ignore = opts.ignore_index
    comparable = low <= ignore <= high
    given, target = target, target if target.dtype == dtype else xp.astype(target, dtype)
    in_group = shard is not None or layout is not None
    values = adapter.concrete(target, in_group) if _checks.readable(target) else None
    if values is None and target is not given and _checks.readable(given):  # a concrete target cast under jit
        before = adapter.concrete(given, in_group)
        values = None if before is None else _compat.array_namespace(before).astype(before, dtype)
    if values is not None:
        if shard is None and layout is None:  # the usual call
            return target, opts, _checks.class_indices(values, classes, ignore, wrapped_bits, comparable)
        check = functools.partial(_checks.class_indices, values, classes, ignore, wrapped_bits, comparable)
        if layout is not None:  # a batch-sharded DTensor target: agreed over the batch ranks
            check = functools.partial(layout.agree, check)
        return target, opts, _on_every_member(check, shard)
    out_of_range = classes + 1 if ignore == classes else classes  # neither a class nor ignore_index
    if wrapped_bits:
        target = xp.where(target < 0, out_of_range, target)
    if not comparable:
        target = xp.where(target == low, out_of_range, target)
        opts = dataclasses.replace(opts, ignore_index=low)  # traced only: the sentinel
    return target, opts, True


def _on_every_member(check: Callable[[], bool], shard: _formulas.Shard | None) -> bool:
    """``check()`` (whether a class index may be ``ignore_index``); with a ``shard``, its IndexError (a
    member's target out of range) raised on every member of the group."""
    if shard is None:
        return check()
    try:
        ignored, error = check(), None
    except IndexError as err:
        ignored, error = True, err
    shard.agree(error)
    return ignored


def _options(
    logits: Array, ignore_index: Any, label_smoothing: Any, z_loss: Any, softcap: Any
) -> tuple[_formulas.Options, float | Array]:
    """The options of a call (:func:`multixent._checks.options`); array options are read by the logits' adapter."""
    return _checks.options(
        ignore_index, label_smoothing, z_loss, softcap, logits, lambda a: adapter_for(logits).scalar(a)
    )


def _option_nan_factor(opts: _formulas.Options, z_coef: float | Array, like: Array, xp: Any) -> Array | None:
    """The factor of the results for array options: 1, or NaN when one is out of its range (their range is
    checked so under tracing; None without array options)."""
    if isinstance(z_coef, float) and not opts.arrays:
        return None
    values = {"label_smoothing": opts.label_smoothing, "z_loss": z_coef, "softcap": opts.softcap}
    return _checks.option_nan_factor(values, xp, like.dtype, device(like))


def _in_dtype(z_coef: float | Array, dtype: Any, xp: Any) -> float | Array:
    """The z-loss coefficient in the compute dtype when it is an array (it never promotes the logits)."""
    return z_coef if isinstance(z_coef, float) else xp.astype(z_coef, dtype)


def _move_axis(a: Array, source: int, destination: int, xp: Any) -> Array:
    """``moveaxis`` as ``permute_dims`` (torch.func.vmap has a batching rule for the latter only)."""
    n = a.ndim
    source, destination = source % n, destination % n
    rest = [i for i in range(n) if i != source]
    order = tuple(source if p == destination else rest[p if p < destination else p - 1] for p in range(n))
    return a if order == tuple(range(n)) else xp.permute_dims(a, order)


def _denominators(call: _Call, dtype: Any, ce: Array | None = None) -> tuple[Array | int, Array | int, Array | None]:
    """The "mean" denominators of the cross-entropy and of the z-loss (ints when known now), and ``Σ ce``
    when ``ce`` is given: with rows that may be ignored, ``Σ ce`` and their count are one reduction of
    the stacked ``(2, R)`` pair (one pass over the rows under ``jit``, not two)."""
    xp = call.xp
    rows = call.rows.shape[0]
    known = _compat.known_size(rows)  # dask's NaN: rows selected by a lazy mask
    n: Array | int = int(rows) if known else xp.sum(xp.ones_like(call.rows[:, 0], dtype=dtype))
    total = None
    if call.counted is None:
        total = None if ce is None else xp.sum(ce)
    elif ce is None or not known:  # (dask stacks no arrays of unknown sizes)
        n = _compat.count_true(call.counted, dtype, xp)
        total = None if ce is None else xp.sum(ce)
    else:
        sums = xp.sum(xp.stack([ce, xp.astype(call.counted, dtype)]), axis=1)
        total, n = sums[0], sums[1]
    total, n = None if total is None else _across(call, total, dtype), _across(call, n, dtype)
    if call.weight is None or not call.is_index:
        return n, n, total
    targets = _formulas.class_targets(
        call.target, call.weight, call.weight.shape[0], call.opts, xp, may_ignore=call.may_ignore
    )
    return _across(call, xp.sum(targets.zero_ignored(targets.weight_at_target, xp)), dtype), n, total


def _across(call: _Call, total: Array | int, dtype: Any) -> Array | int:
    """A sum over the rows summed over the ranks holding other rows (batch-sharded DTensor logits)."""
    return total if call.layout is None else call.layout.sum_batch(total, dtype)


def _lazy(out: Any, *inputs: Array | None) -> Any:
    """``out`` (an array or a tuple of them); dask arrays whose tasks beyond ``inputs``' then run without
    floating-point warnings (:func:`multixent._adapters.generic.quiet_graph`: ``errstate`` does not reach
    ``.compute()``)."""
    outs = out if type(out) is tuple else (out,)
    if not type(outs[0]).__module__.startswith("dask"):  # the usual call pays one type lookup
        return out
    outs = generic.quiet_graph(outs, inputs)
    return outs if isinstance(out, tuple) else outs[0]


def _wrap(call: _Call, out: Array, rows_only: bool = True) -> Array:
    """A DTensor call's result (per row or 0-d, or logits-shaped when not ``rows_only``) as a DTensor: the
    entry points' last step (their DTensor inputs were unwrapped by :func:`_prepare`)."""
    return out if call.layout is None else call.layout.wrap(out, rows_only)


def _reduce(
    call: _Call,
    ce: Array,
    lse: Array,
    z_coef: float | Array,
    out_dtype: Any,
    scales: tuple[Array | float, Array | float] | None = None,
) -> Array:
    """Apply the reduction to the per-row terms (ce, lse); z-loss is ``c·lse²``; NaN for out-of-range array
    options. Sums over the rows include other ranks' rows (batch-sharded DTensor logits: :func:`_across`);
    the result is this member's array (the entry points wrap a DTensor call's back: :func:`_wrap`).
    ``scales``: the sums' factors ``(ce_scale, z_scale)`` known already (the gradient's: "mean" as the sum
    times ``1 / count``); None: "mean" divides the sums by their counts."""
    xp = call.xp
    if _one_reduction(call, ce, z_coef):
        total = xp.sum(ce) if call.reduction == "sum" else _compat.mean(ce, xp)
        return generic.as_array(total if total.dtype == out_dtype else xp.astype(total, out_dtype))
    z_coef = _in_dtype(z_coef, ce.dtype, xp)
    nan_factor = _option_nan_factor(call.opts, z_coef, ce, xp)
    if call.reduction == "none":
        per_row = _per_row(call, ce, lse, z_coef, nan_factor)
        return xp.astype(per_row, out_dtype, copy=False)
    total = _total(call, ce, lse, z_coef, scales)
    total = total if nan_factor is None else total * nan_factor
    return generic.as_array(total if total.dtype == out_dtype else xp.astype(total, out_dtype))


def _one_reduction(call: _Call, ce: Array, z_coef: float | Array) -> bool:
    """The usual call (no z-loss, array option, ignored row or DTensor): "sum", and a "mean" over every row
    (not empty; without class weights for class indices), are one reduction."""
    # len(), not `not`: torch.compile(fullgraph=True) cannot trace `not` of a tuple as a value
    plain = isinstance(z_coef, float) and z_coef == 0.0 and len(call.opts.arrays) == 0 and call.layout is None
    if not plain or call.reduction == "sum":
        return plain
    whole = ce.shape[0] and call.counted is None and (call.weight is None or not call.is_index)
    return call.reduction == "mean" and bool(whole)


def _per_row(call: _Call, ce: Array, lse: Array, z_coef: float | Array, nan_factor: Array | None) -> Array:
    """The "none" reduction: each row's loss, in the batch shape."""
    per_row = ce + _formulas.z_loss(lse, z_coef) if _formulas.may_be_nonzero(z_coef) else ce
    per_row = per_row if nan_factor is None else per_row * nan_factor
    return per_row if len(call.batch_shape) == 1 else call.xp.reshape(per_row, call.batch_shape)  # (R,): as it is


def _total(
    call: _Call, ce: Array, lse: Array, z_coef: float | Array, scales: tuple[Array | float, Array | float] | None
) -> Array:
    """The "sum" or "mean" of the cross-entropy, plus the z-loss's, over every rank's rows (:func:`_reduce`)."""
    xp = call.xp
    z_total = _across(call, xp.sum(lse * lse), ce.dtype) if _formulas.may_be_nonzero(z_coef) else None
    if call.reduction == "sum" or scales is not None:
        ce_scale, z_scale = scales or (1.0, 1.0)
        total = _formulas.scaled(_across(call, xp.sum(ce), ce.dtype), ce_scale)
        z_total = None if z_total is None else _formulas.scaled(z_total, z_scale)
    else:
        ce_count, z_count, ce_total = _denominators(call, ce.dtype, ce)
        total = _formulas.mean(ce_total, ce_count, xp)
        z_total = None if z_total is None else _formulas.mean(z_total, z_count, xp)
    return total if z_total is None else total + z_coef * z_total


def cross_entropy(
    logits: Array,
    target: Array,
    /,
    *,
    axis: int = -1,
    weight: Array | None = None,
    ignore_index: int = _IGNORE_DEFAULT,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    group: Any = None,
    class_offset: int | None = None,
) -> Array:
    r"""Cross-entropy between ``logits`` and ``target``, as torch's ``F.cross_entropy``.

    Class indices or class probabilities, with class weights, ``ignore_index``, label
    smoothing, a z-loss and a softcap, on any array library; the result is that library's
    array, on the logits' device, differentiable through torch autograd and JAX transforms.

    Parameters
    ----------
    logits : array
        Unnormalised scores, real floating (float16, bfloat16, float32 or float64), with the
        classes along ``axis``. float16/bfloat16 are computed in float32.
    target : array
        Integer (any signed or unsigned width): class indices, of the logits' shape without
        ``axis``. Real floating: class probabilities, of the logits' shape. Never broadcast.
        With JAX logits, NumPy arrays and Python numbers are converted onto their device.
    axis : int, default -1
        The class axis: ``-1`` for ``(B, T, V)`` logits, ``1`` for torch's ``(N, C, d1, ...)``.
    weight : array or None, default None
        Class weights, shape ``(C,)``. Differentiable (torch and JAX).
    ignore_index : int, default -100
        Class-index targets equal to it give exactly 0 loss and 0 gradient, whatever their
        logits. Only the default with probability targets.
    reduction : {"mean", "sum", "none"}, default "mean"
        "mean" divides by ``Σ w[y]`` over the counted positions (class indices) or by the
        number of positions (probabilities); it is 0, with a zero gradient, when that is 0.
    label_smoothing : float or 0-d array, default 0.0
        ``ε`` in ``[0, 1]``: the target becomes ``(1-ε)·target + ε/C``.
    z_loss : float or 0-d array, default 0.0
        ``c ≥ 0``: adds ``c·lse²`` per counted position, unweighted (under "mean", divided by
        the number of counted positions).
    softcap : float, 0-d array or None, default None
        ``s > 0``: the logits become ``s·tanh(logits/s)`` before everything else; ``None`` or
        ``inf``: no cap.
    group : str, tuple of str, torch ProcessGroup or None, default None
        The class axis is split over this group (vocabulary parallelism): a JAX mesh axis name
        inside ``jax.shard_map``, or a torch ``ProcessGroup``. See Notes.
    class_offset : int or None, default None
        With ``group``: this member's first class. ``None``: equal shards, ``rank · C_local``.

    Returns
    -------
    array
        The loss: 0-d for "mean" and "sum" (a 0-d ``ndarray`` on NumPy, never a NumPy scalar),
        the logits' shape without ``axis`` for "none"; in the logits' dtype.

    Raises
    ------
    TypeError
        Arrays of two libraries (torch tensors beside NumPy arrays: the message names
        ``torch.as_tensor``); a list, ``None`` or a masked array as an array; logits not real
        floating or of another float type (float8); a boolean or complex target.
    ValueError
        ``reduction`` not one of the three; an option out of its range; ``weight`` not of
        shape ``(C,)``; a target shape that fits neither kind (labels stored as floats and
        swapped arguments are said so); ``axis`` out of range; zero classes; a non-default
        ``ignore_index`` with probability targets.
    IndexError
        A concrete class index outside ``[0, C)`` that is not ``ignore_index``. Under
        tracing (``jax.jit``, ``torch.compile``) that position's loss is NaN instead.
    NotImplementedError
        With a torch ``group``: ``torch.compile``, torch.func transforms, forward mode, double
        backward, or a ``weight`` that requires grad.

    Notes
    -----
    For class indices ``y`` and ``lse(x_i) = log Σ_c exp(x_{i,c})``:

    .. math::

        \ell_i = (1-\varepsilon)\, w_{y_i}\,(\operatorname{lse}(x_i) - x_{i,y_i})
                 + \frac{\varepsilon}{C}\sum_c w_c\,(\operatorname{lse}(x_i) - x_{i,c})
                 + c_z\,\operatorname{lse}(x_i)^2

    and for class probabilities :math:`\sum_c w_c t'_{i,c}(\operatorname{lse}(x_i) - x_{i,c})`
    with :math:`t' = (1-\varepsilon)t + \varepsilon/C`. ``softcap=s`` first maps the
    logits to :math:`s\tanh(x/s)`. "mean" divides by :math:`\sum w_{y_i}` over
    counted positions (by the number of positions for probabilities; by the
    counted positions for the z-loss), and is 0 when that is 0.

    **A class axis split over a group** (vocabulary parallelism): ``group`` is a JAX mesh
    axis name (a str or tuple of str; inside ``jax.shard_map``) or a torch
    ``ProcessGroup`` (``torch.distributed.group.WORLD`` too), and ``logits`` holds this
    member's ``C_local`` consecutive classes ``[class_offset, class_offset + C_local)``
    of the global ``C``. ``class_offset=None``: equal shards, the offset is
    ``rank · C_local`` (always so in ``shard_map``); with torch, uneven shards give
    their ``class_offset`` on every member (the shards must tile ``[0, C)``; ``C`` is
    ``Σ C_local``). ``target`` holds global class indices, the same on every member
    (probabilities: sharded like the logits); ``weight`` is the full ``(C,)`` vector,
    the same on every member. The per-row max, ``Σ exp``, the target's logit and the
    smoothing and probability sums are all-reduced across the group (a few ``(rows,)``
    vectors, never the logits); the loss is the whole axis's, the same on every member,
    and each member's gradient is its shard's. Concrete out-of-range targets raise on
    every member (checked against the global ``C``). torch: a call checks its arguments, then
    one all-gather agrees on the outcome and on what must be the same on every member (rows,
    dtypes, options, ``ignore_index``, the weight's length): an error on one member, or a
    difference, raises the same error on every member. Not compared: the values of the logits
    and targets, and whether every member passed ``group`` at all. A member may hold no class.
    torch: backward runs on every member; not under ``torch.compile``, torch.func transforms,
    forward mode, nor with a ``weight`` requiring grad (NotImplementedError). JAX: ``grad``, ``jit`` and ``vmap``
    inside ``shard_map`` (with its default ``check_vma=True``). ``group`` names every mesh
    axis the class axis is split over (``in_specs`` ``P(None, ("a", "b"))``: ``group=("a", "b")``).
    Inside ``shard_map`` nothing tells which array axis a mesh axis splits, so an axis the
    group leaves out is taken for another split (the batch's): a class axis split over it
    too gives each member the loss over its part of the classes only, which ``shard_map``
    reports as a result varying over that axis where ``out_specs`` say replicated; a
    concrete target beyond those classes raises an IndexError naming the axis.

    Examples
    --------
    >>> import numpy as np, multixent
    >>> x = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    >>> round(float(multixent.cross_entropy(x, np.array([0, -100]))), 6)  # the second row ignored
    0.241311
    >>> multixent.cross_entropy(x, np.array([0, 2]), reduction="none").round(6)
    array([0.241311, 0.169846])
    >>> round(float(multixent.cross_entropy(x, np.array([0, 2]), label_smoothing=0.1)), 6)
    0.363912
    """
    call, z = _prepare(
        logits,
        target,
        weight,
        axis,
        reduction,
        lambda: _options(logits, ignore_index, label_smoothing, z_loss, softcap),
        "logits",
        None,
        group,
        class_offset,
    )
    opts = call.opts
    dtype = logits.dtype
    if reduction != "none" and isinstance(z, float) and not opts.arrays and call.shard is None and call.layout is None:
        # "mean"/"sum" that autograd records for the logits alone, in one block: the loss and its
        # gradient in one pass (cross_entropy_and_grad's), the backward scales the gradient
        fused = call.adapter.fused(call.rows, call.target, call.weight, _LossAt(call, z, dtype))
        if fused is not None:
            return fused
    return _lazy(_wrap(call, _loss(call, z, dtype)), logits, target, weight)


class _LossAt:
    """A call's loss at other logits ``rows`` by the usual route; ``grad``: ``(loss, ∂loss/∂rows)`` in one pass.
    The fused route's ``loss`` (:meth:`multixent._adapters.Adapter.fused`), which the graph keeps as long as
    it lives: from its first call on, it holds the call without the call's own logits (the backward's saved
    tensors, freed when it has run)."""

    __slots__ = ("call", "dtype", "z_coef")

    def __init__(self, call: _Call, z_coef: float | Array, dtype: Any) -> None:
        self.call, self.z_coef, self.dtype = call, z_coef, dtype

    def __call__(self, rows: Array, grad: bool = False) -> Any:
        if self.call.rows is not None:
            self.call = dataclasses.replace(self.call, rows=None)
        at = dataclasses.replace(self.call, rows=rows)
        return _loss_and_grad(at, self.z_coef, self.dtype) if grad else _loss(at, self.z_coef, self.dtype)


def _loss(call: _Call, z_coef: float | Array, out_dtype: Any) -> Array:
    """The reduced loss of a prepared call, through the adapter's ``row_losses``."""
    with call.adapter.quiet():
        need_lse = _formulas.may_be_nonzero(z_coef)
        ce, lse = call.adapter.row_losses(
            call.rows, call.target, call.weight, call.opts, call.may_ignore, call.xp, call.shard, need_lse
        )
        return _reduce(call, ce, lse, z_coef, out_dtype)


def _scales(call: _Call, dtype: Any, with_z: bool) -> tuple[Array | float, Array | float]:
    """The factors of ``Σ ce`` and of the z-loss's ``Σ lse²`` in the call's reduction: 1 for "sum"; for "mean"
    ``1 / Σ w_y`` (class indices with weights; 0 where that is 0) or one over the count of rows
    (:func:`multixent._formulas.inverse_count`), and the z-loss's over the counted rows (1 without z-loss).
    Python floats where the counts are known now."""
    if call.reduction != "mean":
        return 1.0, 1.0
    xp = call.xp
    ce_count, z_count, _ = _denominators(call, dtype)
    if call.weight is not None and call.is_index:  # Σ w_y
        ce_scale = _formulas.mean(xp.ones((), dtype=dtype, device=device(call.rows)), ce_count, xp)
    else:
        ce_scale = _formulas.inverse_count(ce_count, xp)
    return ce_scale, _formulas.inverse_count(z_count, xp) if with_z else 1.0


def _loss_and_grad(call: _Call, z_coef: float | Array, out_dtype: Any) -> tuple[Array, Array]:
    """The reduced loss ("mean" or "sum") and its gradient with respect to ``call.rows``, in one pass."""
    xp = call.xp
    dtype = _formulas.compute_dtype(call.rows.dtype, xp)
    z_coef = _in_dtype(z_coef, dtype, xp)
    arrays = call.opts.arrays
    plan = call.adapter.plan(call.rows, call.target, call.weight, *arrays, may_ignore=call.may_ignore, shard=call.shard)
    ce_scale, z_scale = _scales(call, dtype, _formulas.may_be_nonzero(z_coef))
    with call.adapter.quiet():
        ce, lse, grad = _rows.row_losses_and_grad(
            call.rows,
            call.target,
            call.weight,
            ce_scale,
            2.0 * z_coef * z_scale if _formulas.may_be_nonzero(z_coef) else 0.0,
            call.opts.astype(dtype, xp) if arrays else call.opts,
            plan,
            xp=xp,
            need_lse=_formulas.may_be_nonzero(z_coef),
        )
        loss = _reduce(call, ce, lse, z_coef, out_dtype, (ce_scale, z_scale))
        nan_factor = _option_nan_factor(call.opts, z_coef, ce, xp)
        return loss, grad if nan_factor is None else grad * xp.astype(nan_factor, grad.dtype)


def cross_entropy_and_grad(
    logits: Array,
    target: Array,
    /,
    *,
    axis: int = -1,
    weight: Array | None = None,
    ignore_index: int = _IGNORE_DEFAULT,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    group: Any = None,
    class_offset: int | None = None,
) -> tuple[Array, Array]:
    r"""``(loss, ∂loss/∂logits)`` of :func:`cross_entropy`, for "mean" and "sum".

    The loss and its exact gradient in one pass, on any array library, without autodiff
    (NumPy, array-API libraries); on torch and JAX the same numbers as their autodiff of
    :func:`cross_entropy`.

    Parameters
    ----------
    logits : array
        Unnormalised scores, real floating, with the classes along ``axis``.
    target : array
        Class indices (integer, the logits' shape without ``axis``) or class probabilities
        (floating, the logits' shape).
    axis : int, default -1
        The class axis.
    weight : array or None, default None
        Class weights, shape ``(C,)``.
    ignore_index : int, default -100
        Class-index targets equal to it give 0 loss and 0 gradient.
    reduction : {"mean", "sum"}, default "mean"
        As :func:`cross_entropy`; "none" has no single gradient and is refused.
    label_smoothing : float or 0-d array, default 0.0
        ``ε`` in ``[0, 1]``.
    z_loss : float or 0-d array, default 0.0
        ``c ≥ 0``: adds ``c·lse²`` per counted position.
    softcap : float, 0-d array or None, default None
        ``s > 0``: logits ``s·tanh(logits/s)``; ``None`` or ``inf``: no cap.
    group : str, tuple of str, torch ProcessGroup or None, default None
        A class axis split over a group, as :func:`cross_entropy`.
    class_offset : int or None, default None
        With ``group``: this member's first class.

    Returns
    -------
    loss : array
        0-d, in the logits' dtype.
    grad : array
        ``∂loss/∂logits``, of the logits' shape and dtype (with ``group``: this member's shard).

    Raises
    ------
    ValueError
        ``reduction`` other than "mean" or "sum"; the other errors of :func:`cross_entropy`.
    TypeError
        As :func:`cross_entropy`.
    IndexError
        As :func:`cross_entropy`.

    Notes
    -----
    The gradient is the closed form

    .. math::

        \mathrm{scale}\cdot(\operatorname{softmax}(x)\sum_c a_c - a)
        + 2 c_z\,\mathrm{scale}_z\operatorname{lse}(x)\operatorname{softmax}(x)

    (``a`` the weighted, smoothed target distribution; times :math:`1-\tanh^2`
    under softcap), computed in one pass with the loss on any array library.
    ``group``/``class_offset``: a class axis split over a group, as :func:`cross_entropy`;
    the gradient is this member's shard.

    Examples
    --------
    >>> import numpy as np, multixent
    >>> x = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]]); y = np.array([0, 2])
    >>> loss, grad = multixent.cross_entropy_and_grad(x, y)
    >>> round(float(loss), 6)
    0.205579
    >>> grad.round(4)
    array([[-0.1072,  0.0876,  0.0196],
           [ 0.021 ,  0.0571, -0.0781]])
    """

    def parse() -> tuple[_formulas.Options, float | Array]:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"multixent: cross_entropy_and_grad supports reduction 'mean' or 'sum'; got {reduction!r}")
        return _options(logits, ignore_index, label_smoothing, z_loss, softcap)

    call, z_coef = _prepare(
        logits, target, weight, axis, reduction, parse, "logits", None, group, class_offset, "and_grad"
    )
    xp = call.xp
    loss, grad = _loss_and_grad(call, z_coef, logits.dtype)
    if len(call.batch_shape) != 1 or call.axis != 1:  # (rows, C) logits are the rows themselves
        moved = (*call.batch_shape[: call.axis], *call.batch_shape[call.axis :], call.rows.shape[-1])
        grad = _move_axis(xp.reshape(grad, moved), -1, call.axis, xp)
    pair: tuple[Array, Array] = _lazy((_wrap(call, loss), _wrap(call, grad, rows_only=False)), logits, target, weight)
    return pair


def nll_loss(
    log_probs: Array,
    target: Array,
    /,
    *,
    axis: int = -1,
    weight: Array | None = None,
    ignore_index: int = _IGNORE_DEFAULT,
    reduction: str = "mean",
) -> Array:
    r"""Negative log-likelihood of class indices, as torch's ``F.nll_loss``.

    Parameters
    ----------
    log_probs : array
        Log-probabilities (for instance :func:`log_softmax`'s), real floating, with the classes
        along ``axis``.
    target : array
        Class indices, integer, of the shape of ``log_probs`` without ``axis``.
    axis : int, default -1
        The class axis.
    weight : array or None, default None
        Class weights, shape ``(C,)``.
    ignore_index : int, default -100
        Targets equal to it give 0 loss and 0 gradient.
    reduction : {"mean", "sum", "none"}, default "mean"
        "mean" divides by ``Σ w[y]`` over the counted positions (0 when that is 0).

    Returns
    -------
    array
        0-d for "mean" and "sum", the target's shape for "none"; in the dtype of ``log_probs``.

    Raises
    ------
    TypeError
        A floating target; arrays of two libraries; ``log_probs`` not real floating.
    ValueError
        ``reduction`` not one of the three; ``weight`` not of shape ``(C,)``; a target shape
        other than that of ``log_probs`` without ``axis``; ``axis`` out of range.
    IndexError
        A concrete class index outside ``[0, C)`` that is not ``ignore_index``.

    Notes
    -----
    .. math:: \ell_i = -w_{y_i}\,\log p_{i,y_i}

    "mean" divides by :math:`\sum w_{y_i}` over counted positions (0 when that is 0).
    DTensor ``log_probs`` sharded on the class axis: the target's entry comes from the rank holding it.

    Examples
    --------
    >>> import numpy as np, multixent
    >>> x = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]]); y = np.array([0, 2])
    >>> round(float(multixent.nll_loss(multixent.log_softmax(x), y)), 6)  # = cross_entropy(x, y)
    0.205579
    """
    call, _ = _prepare(
        log_probs,
        target,
        weight,
        axis,
        reduction,
        lambda: (_formulas.Options(_checks.integer(ignore_index, "ignore_index")), 0.0),
        "log_probs",
        "nll_loss",
        function="nll_loss",
    )
    xp = call.xp
    dtype = _formulas.compute_dtype(log_probs.dtype, xp)
    local, shard = call.rows.shape[-1], call.shard
    plan = call.adapter.plan(call.rows, call.target, call.weight, may_ignore=call.may_ignore)
    targets = _formulas.class_targets(
        call.target,
        call.weight,
        local if shard is None else shard.num_classes,
        call.opts,
        xp,
        may_ignore=call.may_ignore,
        shard=shard,
        num_local=local,
        assert_none=plan.assert_none,
    )
    picked = _formulas.gather_rows(call.rows, targets.index, xp)
    if shard is not None and targets.here is not None:  # from the one member holding the target's class
        picked = shard.sum(xp.where(targets.here, picked, xp.zeros_like(picked)))
    with call.adapter.quiet():
        nll = targets.row_values(-targets.weight_at_target * xp.astype(picked, dtype), xp)
        return _lazy(_wrap(call, _reduce(call, nll, nll, 0.0, log_probs.dtype)), log_probs, target, weight)


def linear_cross_entropy(
    hidden: Array,
    classifier: Array,
    target: Array,
    /,
    *,
    bias: Array | None = None,
    chunk_size: int | None = None,
    weight: Array | None = None,
    ignore_index: int = _IGNORE_DEFAULT,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    group: Any = None,
    class_offset: int | None = None,
) -> Array:
    r"""``cross_entropy(hidden @ classifier.T + bias, target, ...)`` without materialising the logits.

    The value, and the gradients with respect to ``hidden``, ``classifier`` and ``bias``
    (through torch autograd and JAX autodiff), equal the naive path's; only a chunk of rows'
    logits exists at once.

    Parameters
    ----------
    hidden : array
        ``(..., D)``: the last hidden states, real floating.
    classifier : array
        ``(V, D)``, the layout of ``torch.nn.Linear.weight`` (an LM head's weight).
    target : array
        Class indices, integer, of shape ``(...)`` (``hidden``'s without ``D``).
    bias : array or None, default None
        ``(V,)``.
    chunk_size : int or None, default None
        Rows per chunk; ``None``: ``max(1, 2**23 // V)`` (a chunk's logits at most ~8M
        elements, 32 MiB in float32).
    weight : array or None, default None
        Class weights, shape ``(V,)``. Differentiable.
    ignore_index : int, default -100
        Targets equal to it give 0 loss and 0 gradient.
    reduction : {"mean", "sum", "none"}, default "mean"
        As :func:`cross_entropy`.
    label_smoothing : float or 0-d array, default 0.0
        As :func:`cross_entropy`.
    z_loss : float or 0-d array, default 0.0
        As :func:`cross_entropy`.
    softcap : float, 0-d array or None, default None
        As :func:`cross_entropy`.
    group : str, tuple of str, torch ProcessGroup or None, default None
        The classifier split by vocabulary rows over this group (see Notes).
    class_offset : int or None, default None
        With ``group``: this member's first classifier row.

    Returns
    -------
    array
        The loss: 0-d for "mean" and "sum", ``hidden``'s shape without ``D`` for "none"; in
        the inputs' dtype (at least float32 under ``torch.autocast``).

    Raises
    ------
    ValueError
        ``hidden`` without a dimension; ``classifier`` not ``(V, D)`` or with zero classes;
        shapes of ``hidden``, ``classifier``, ``bias`` or ``target`` that do not fit (each
        named); ``chunk_size`` not positive; the option errors of :func:`cross_entropy`.
    TypeError
        ``chunk_size`` not an int or None; DTensor inputs (pass local tensors and ``group``);
        the type errors of :func:`cross_entropy`.
    IndexError
        A concrete class index outside ``[0, V)`` that is not ``ignore_index``.
    NotImplementedError
        With a torch ``group``: ``torch.compile``, torch.func or double backward.

    Notes
    -----
    The rows are processed ``chunk_size`` at a time, so only a chunk's logits
    (``chunk_size × V``) exist at once. ``chunk_size=None`` takes
    ``max(1, 2**23 // V)`` rows (at most all of them): a chunk's logits hold at
    most ~8M elements (32 MiB in float32) whatever the batch, and the extra
    memory is the gradients (``h̄``, ``W̄``, ``b̄``) plus about two such
    chunk-sized arrays (measured at N=8192, D=512, V=32768, float32,
    forward+backward: 0.17× the full logits' bytes on torch and under
    ``jax.jit``, against 3.0× and 2.1× for the naive path). A larger chunk
    means fewer passes over ``classifier`` and its gradient and larger matrix
    products, a smaller one less memory. With JAX the chunks run in one
    ``lax.scan`` (the remainder after it); with torch inside custom ops
    (``torch.library``), which ``torch.compile`` keeps opaque: it compiles
    in the time of one chunk whatever their number; elsewhere in a Python loop.

    Gradients: for "mean" and "sum" they are computed during the forward
    (the upstream gradient is one scalar, so the backward only scales them:
    three matrix products, as the naive path); the forward therefore holds
    ``h̄`` and ``W̄`` until the backward. For "none" the backward recomputes each
    chunk's logits from the saved per-row log-sum-exp (four matrix products).
    A second ``backward`` through a retained graph works; a backward with
    ``create_graph=True`` (double backward, ``gradgradcheck``) differentiates
    the unchunked logits (the full logits' memory, only then).
    Under torch.func transforms (``grad``, ``vmap``, ``jacrev``, ``jacfwd``,
    ``hessian``) the logits are computed at once, without chunks, through the
    cross-entropy's own Function. JAX defines
    reverse mode (``custom_vjp``: ``grad``, ``vjp``, ``jit``, ``vmap``), not
    forward mode.

    float16/bfloat16 inputs are computed in float32 (the classifier is upcast
    once; the logits, softmax and gradient accumulation are float32); the
    gradients come back in each input's dtype. Under ``torch.autocast``,
    ``hidden``, ``classifier`` and ``bias`` are first cast to the autocast
    dtype, as ``F.linear`` casts them (float64 stays), then computed as such
    inputs; the loss is at least float32, as ``F.cross_entropy``'s there.

    ``weight`` (the class weights) is differentiated too, with the true
    derivative: per counted row with (softcapped) logits ``z`` and class ``y``,
    ``∂ce/∂w_c = (1-ε)[c=y](lse - z_y) + ε/C (lse - z_c)``, and "mean" adds
    the dependence of its denominator ``Σ w_y`` (torch's ``F.cross_entropy``
    refuses this gradient). It costs one more pass over the chunks, made
    only when ``weight`` requires grad on torch (JAX's backward always
    computes it when ``weight`` is given; under ``jit`` XLA drops it unless used).

    ``hidden`` of size 0 in ``D`` gives logits equal to ``bias`` (or 0: ``log V``
    per row). NumPy and other libraries without autodiff return the value.

    ``group``/``class_offset`` (see :func:`cross_entropy`): the classifier split by vocabulary
    rows over a group (a column-parallel LM head): ``classifier`` ``(V_local, D)`` and ``bias``
    ``(V_local,)`` are this member's rows ``[class_offset, class_offset + V_local)``, ``hidden``
    and ``target`` (global indices) are the same on every member, ``weight`` the full ``(V,)``.
    The loss is the whole vocabulary's on every member; the gradients are this member's
    ``classifier``/``bias`` rows and the *full* ``hidden`` gradient, already all-reduced over
    the group (the same on every member: do not all-reduce it again), and the full ``weight``
    gradient. torch: eager only (no ``torch.compile``, torch.func or double backward);
    the chunk loops run in Python instead of custom ops.

    Examples
    --------
    >>> import numpy as np, multixent
    >>> h = np.array([[1.0, 0.0], [0.0, 2.0]]); W = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> y = np.array([0, 2])
    >>> round(float(multixent.linear_cross_entropy(h, W, y)), 6)
    0.583115
    >>> round(float(multixent.cross_entropy(h @ W.T, y)), 6)
    0.583115
    """
    members = _Members(group, class_offset)
    try:
        opts, z_coef = _options(hidden, ignore_index, label_smoothing, z_loss, softcap)
        ignore_index = opts.ignore_index
        xp, (hidden, classifier, target, bias, weight) = _linear_arrays(hidden, classifier, target, bias, weight)
        local_classes, dim = _checks.linear_shapes(hidden, classifier, bias, target, sharded=group is not None)
        chunk_size = _checks.chunk_size(chunk_size)
        reduction = _checks.reduction(reduction)
        _checks.ignore_index(ignore_index, True, _IGNORE_DEFAULT)
        members.check_weight_and_group(weight, local_classes, xp, hidden, target, None, opts)
        if (dt := dtensor_adapter(hidden, classifier, bias, target, weight)) is not None:
            dt.refuse("linear_cross_entropy")
    except _CHECK_ERRORS as err:  # with a group: raised on every member, none left waiting
        raise members.failed(err) from None
    shard = members.agree(
        classifier,
        0,
        hidden,
        target,
        bias,
        weight,
        values=lambda: (
            ("function", "linear_cross_entropy"),
            ("rows", _row_count(tuple(hidden.shape), hidden.ndim - 1)),
            ("hidden size", dim),
            ("hidden dtype", _dtype_name(hidden)),
            ("classifier dtype", _dtype_name(classifier)),
            ("bias dtype", _dtype_name(bias)),
            ("chunk_size", -1 if chunk_size is None else chunk_size),
            ("weight length", _weight_length(weight)),
            *_agreed_options(opts, z_coef, reduction),
        ),
    )
    num_classes = _group_classes(shard, local_classes, weight, xp)
    adapter = adapter_for(hidden)
    may_ignore = _linear_may_ignore(target, num_classes, ignore_index, adapter, shard)

    dtype = _linear.compute_dtype(hidden, classifier, bias, xp)
    out_dtype = adapter.linear_out_dtype(xp.result_type(hidden.dtype, classifier.dtype), hidden)
    h = xp.reshape(hidden, (math.prod(hidden.shape[:-1]), dim))  # not -1: D may be 0
    t = xp.reshape(target, (-1,))
    if weight is not None:
        weight = xp.astype(weight, dtype)
    n_rows = h.shape[0]
    chunk = _linear.default_chunk(n_rows, local_classes) if chunk_size is None else min(chunk_size, max(n_rows, 1))
    # _reduce and _denominators read only the row count of call.rows: hidden's rows stand in for the logits
    call = _Call(
        xp=xp,
        rows=h,
        target=t,
        weight=weight,
        counted=t != ignore_index if may_ignore else None,
        may_ignore=may_ignore,
        batch_shape=tuple(hidden.shape[:-1]),
        axis=-1,
        is_index=True,
        reduction=reduction,
        opts=opts,
        adapter=adapter,
        shard=None,  # the group's split is the classifier's (``linear.shard``); the hidden rows are whole
        layout=None,
    )
    linear = _linear.LinearCall(h, classifier, bias, t, weight, opts, may_ignore, chunk, xp, shard)

    with adapter.quiet():
        loss = _linear_loss(call, linear, z_coef, dtype, out_dtype)
    return _lazy(loss, hidden, classifier, target, bias, weight)


def _linear_arrays(
    hidden: Array, classifier: Array, target: Array, bias: Array | None, weight: Array | None
) -> tuple[Any, tuple[Array, Array, Array, Array | None, Array | None]]:
    """``(xp, (hidden, classifier, target, bias, weight))`` of ``linear_cross_entropy``, checked: one library
    (NumPy arrays converted as :func:`multixent._checks.namespace` says), floating ``hidden``,
    ``classifier`` and ``bias``, class indices."""
    xp, arrays = _checks.namespace(
        hidden,
        classifier,
        target,
        bias,
        weight,
        names=("hidden", "classifier", "target", "bias", "weight"),
        numpy_inputs=adapter_for(hidden).NUMPY_INPUTS,
    )
    hidden, classifier, target, bias, _ = arrays
    _checks.floating(hidden, "hidden", xp)
    _checks.floating(classifier, "classifier", xp)
    if bias is not None:
        _checks.floating(bias, "bias", xp)
    if not _checks.index_target(target, xp):
        raise TypeError(f"multixent: linear_cross_entropy takes class indices (an integer target); got {target.dtype}")
    return xp, arrays  # type: ignore[return-value]


def _linear_may_ignore(
    target: Array, classes: int, ignore: int, adapter: Adapter, shard: _formulas.Shard | None
) -> bool:
    """Whether a class index may be ``ignore_index``: concrete ones checked (an IndexError on every member of
    a group where one member's is out of range), traced ones NaN where out of range."""
    values = adapter.concrete(target, shard is not None)
    if values is None:  # (accelerators, eagerly: asserted on the device, Plan.assert_none)
        return True
    return _on_every_member(functools.partial(_checks.class_indices, values, classes, ignore), shard)


def _linear_loss(call: _Call, linear: _linear.LinearCall, z_coef: float | Array, dtype: Any, out_dtype: Any) -> Array:
    """``linear_cross_entropy``'s loss of a prepared call (``call.rows``: the hidden rows)."""
    xp, adapter = call.xp, call.adapter
    if call.reduction == "none":
        ce, lse = adapter.linear_rows(linear)
        return _reduce(call, ce, lse, z_coef, out_dtype)
    # the scales as arrays (the chunk loop's op takes tensors), made there: a Python number's copy would synchronise
    one = xp.ones((), dtype=dtype, device=device(call.rows))
    ce_scale, z_scale = (_formulas.scaled(one, s) for s in _scales(call, dtype, _formulas.may_be_nonzero(z_coef)))
    z_coef = _in_dtype(z_coef, dtype, xp)
    lse_scale = (2.0 * z_coef) * z_scale if _formulas.may_be_nonzero(z_coef) else None
    loss = adapter.linear_scalar(linear, ce_scale, lse_scale)
    nan_factor = _option_nan_factor(call.opts, z_coef, loss, xp)
    loss = loss if nan_factor is None else loss * nan_factor
    return generic.as_array(xp.astype(loss, out_dtype, copy=False))  # NumPy: a 0-d array, as cross_entropy's
