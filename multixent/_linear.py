"""The fused, chunked linear cross-entropy: ``cross_entropy(hidden @ classifier.T + bias, target)``.

Rows are processed in chunks of ``chunk`` rows, so that only one chunk's logits
``z = h_c @ W.T + b`` (``chunk × V``) exist at a time. Each chunk's logits go
through the row functions of :mod:`multixent._rows` (the same forward and
closed-form gradient as :func:`multixent.cross_entropy`); this module only adds
the three matrix products around them::

    z   = h_c @ W.T + b         (per chunk)
    ḡ   = ∂loss/∂z              (closed form, per chunk, from _rows)
    h̄_c = ḡ @ W,   W̄ += ḡ.T @ h_c,   b̄ += Σ_rows ḡ

Two ways to differentiate, chosen by the reduction:

* "mean" and "sum" (:func:`loss_and_grads`): the incoming gradient is one
  scalar, so the gradients are computed *during the forward* and the backward
  only scales them (as Liger-Kernel does): 3 matrix products in all, as the
  naive path.
* "none" (:func:`rows` then :func:`rows_vjp`): the incoming gradient differs
  per row, so the forward keeps only the per-row ``lse`` and the backward
  recomputes each chunk's logits (4 matrix products).

The class weights' gradient (:func:`weight_vjp`) recomputes each chunk's
logits: ``w̄_c = Σ_rows ce_bar·((1-ε)[c=y](lse - z_y) + ε/C (lse - z_c))``.

With the classifier split by vocabulary rows over a group (``Spec.plan.shard``: a
column-parallel LM head, ``hidden`` replicated), each member's chunks are its
``(chunk, V_local)`` logits, the row statistics span the group (:mod:`multixent._formulas`),
``W̄`` and ``b̄`` are the member's rows and ``h̄`` is summed over the group (the full
gradient, the same on every member); the class weights are the full ``(V,)`` and so is ``w̄``.

Nothing here names a framework; an adapter may pass :class:`Hooks` (an
in-place ``acc += a @ b``; a compiled loop over the chunks) and
``Spec.block_rows`` (cache blocking inside a chunk).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_extra as xpx

from . import _formulas, _rows
from ._compat import device

Array = Any
Namespace = Any

#: Logits elements per chunk when ``chunk_size`` is None: ``chunk = max(1,
#: CHUNK_ELEMENTS // V)`` rows; 2**23 elements are 32 MiB in float32. Eager
#: backends overwrite a chunk's logits with its gradient, block by block (the
#: logits are its only chunk-sized array); XLA fuses the chunk. Larger chunks are
#: faster (fewer passes over the classifier and its gradient, larger matrix
#: products) and hold more memory: a measured trade-off, not part of the math
#: (``nox -s bench``; the figures are in benchmarks/results/).
CHUNK_ELEMENTS = 2**23

#: ``W̄`` accumulates over the chunks in the compute dtype (float32 for half-precision inputs) and is rounded to
#: the classifier's dtype once, at the end: as accurate as ``F.linear``'s backward, whose one product rounds
#: once. Only the products that take half-precision operands (:attr:`Hooks.matmul_to`: JAX, torch on accelerators)
#: have the choice; False keeps ``W̄`` in the classifier's dtype (``V·D`` half-precision elements less), with
#: one rounding per chunk, so that its error grows with the number of chunks (docs/large-vocabularies.md). The
#: GPU check (``benchmarks/gpu.py``) measures both.
W_BAR_IN_COMPUTE_DTYPE = True


@dataclass(frozen=True)
class Spec:
    """The static (hashable) part of one call: the user's options, the plan of each chunk, the chunking."""

    opts: _formulas.Options
    plan: _rows.Plan  # its block_rows: rows per cache block inside a chunk (None: the whole chunk)
    chunk: int  # rows per chunk


@dataclass(frozen=True)
class LinearCall:
    """One validated ``linear_cross_entropy`` call, its arrays flattened to rows: what an adapter receives."""

    h: Array  # (N, D) hidden states
    w: Array  # (V, D) classifier
    b: Array | None  # (V,) bias
    target: Array  # (N,) class indices
    weight: Array | None  # (V,) class weights in the compute dtype
    opts: _formulas.Options
    may_ignore: bool  # False: the indices were checked, none is ignore_index
    chunk: int  # rows per chunk
    xp: Namespace
    shard: _formulas.Shard | None = None  # the classifier's rows split over a group


def default_chunk(rows: int, num_classes: int) -> int:
    """Rows per chunk for ``chunk_size=None`` (see :data:`CHUNK_ELEMENTS`)."""
    return max(1, min(max(rows, 1), CHUNK_ELEMENTS // max(num_classes, 1)))


def _add(acc: Array, a: Array, b: Array) -> Array:
    return acc + a @ b


Body = Callable[[Any, tuple[Array, ...]], tuple[Any, tuple[Array, ...]]]


def chunk_loop(
    body: Body, carry: Any, xs: tuple[Array, ...], chunk: int, xp: Namespace
) -> tuple[Any, tuple[Array, ...]]:
    """Apply ``body`` to consecutive ``chunk``-row slices of ``xs``, threading ``carry``.

    Returns the final carry and the chunks' outputs concatenated along rows.
    """
    rows = xs[0].shape[0]
    outs = []
    for a in range(0, max(rows, 1), chunk):
        carry, out = body(carry, tuple(x[a : min(a + chunk, rows), ...] for x in xs))
        outs.append(out)
    if len(outs) == 1:
        return carry, outs[0]
    return carry, tuple(xp.concat(parts) for parts in zip(*outs, strict=True))


def chunk_losses_and_grad(
    z: Array,
    target: Array,
    weight: Array | None,
    ce_scale: Array,
    lse_scale: Array | float,
    spec: Spec,
    xp: Namespace,
    products: Any,
) -> tuple[Array, Array, Array]:
    """A chunk's ``(ce, lse, ḡ)`` from its logits ``z`` (overwritten: ``ḡ`` may be ``z``), by
    :func:`multixent._rows.row_losses_and_grad` with the chunk's plan (:attr:`Hooks.chunk_losses_and_grad`);
    ``ḡ`` in the compute dtype (a hook may give it in ``products``, the products' dtype, instead)."""
    return _rows.row_losses_and_grad(
        z, target, weight, ce_scale, lse_scale, spec.opts, spec.plan, xp=xp, overwrite=True
    )


@dataclass(frozen=True)
class Hooks:
    """Framework-supplied primitives; the defaults are plain array-API code."""

    #: ``acc + a @ b``, possibly updating ``acc`` in place (``acc`` may be wider than the operands: the sum in
    #: its dtype).
    matmul_add: Callable[[Array, Array, Array], Array] = _add
    #: ``loop(body, carry, xs, chunk, xp)`` as :func:`chunk_loop`. JAX passes a
    #: ``lax.scan``: an unrolled Python loop lets XLA schedule every chunk's
    #: logits at once (all the memory the chunking saves) and compiles slowly.
    loop: Callable[[Body, Any, tuple[Array, ...], int, Namespace], tuple[Any, tuple[Array, ...]]] = chunk_loop
    #: ``matmul_to(a, b, dtype)``: ``a @ b`` of operands in a narrower dtype, accumulated and returned in
    #: ``dtype``. None: the products take their operands in the compute dtype (the classifier cast to it
    #: once). Given (JAX, torch on accelerators: tensor cores), they take them in the inputs' own dtype
    #: (:func:`_classifier`).
    matmul_to: Callable[[Array, Array, Any], Array] | None = None
    #: ``(z, target, weight, ce_scale, lse_scale, spec, xp, products)`` ↦ a chunk's ``(ce, lse, ḡ)`` in one pass
    #: over its logits, as :func:`chunk_losses_and_grad` (torch's compiled strategy: that pass compiled, ``ḡ``
    #: rounded to ``products``, the products' dtype from :func:`_classifier`, inside it).
    chunk_losses_and_grad: Callable[..., tuple[Array, Array, Array]] = chunk_losses_and_grad


PLAIN = Hooks()


def _classifier(h: Array, w: Array, b: Array | None, xp: Namespace, hooks: Hooks) -> tuple[Any, Array]:
    """The compute dtype, and the classifier in the dtype the matrix products take their operands in: the
    compute dtype; with ``hooks.matmul_to``, the inputs' own (no copy of a half-precision classifier: the
    logits ``h_c @ Wᵀ`` accumulated in the compute dtype, the logits' gradient rounded to the inputs' dtype
    for ``ḡ @ W`` and ``ḡᵀ @ h_c``, as ``F.linear``'s backward receives it; ``W̄`` as
    :data:`W_BAR_IN_COMPUTE_DTYPE` says)."""
    dtype = compute_dtype(h, w, b, xp)
    operands = dtype if hooks.matmul_to is None else xp.result_type(h.dtype, w.dtype)
    return dtype, xp.astype(w, operands, copy=False)


def _logits(h: Array, w: Array, b: Array | None, dtype: Any, xp: Namespace, hooks: Hooks = PLAIN) -> Array:
    """One chunk's logits ``h @ Wᵀ + b`` in the compute dtype ``dtype`` (``w`` from :func:`_classifier`)."""
    a = xp.astype(h, w.dtype, copy=False)
    z = a @ w.T if hooks.matmul_to is None or w.dtype == dtype else hooks.matmul_to(a, w.T, dtype)
    return z if b is None else z + b


def unchunked_logits(h: Array, w: Array, b: Array | None, xp: Namespace) -> Array:
    """All the logits ``h @ W.T + b`` at once, in the compute dtype (the paths that differentiate them)."""
    dtype = compute_dtype(h, w, b, xp)
    return _logits(
        h, xp.astype(w, dtype, copy=False), None if b is None else xp.astype(b, dtype, copy=False), dtype, xp
    )


def compute_dtype(h: Array, w: Array, b: Array | None, xp: Namespace) -> Any:
    dtypes = (h.dtype, w.dtype) if b is None else (h.dtype, w.dtype, b.dtype)
    return _formulas.compute_dtype(xp.result_type(*dtypes), xp)


def _zero_grads(w: Array, b: Array | None, dtype: Any, xp: Namespace, spec: Spec) -> tuple[Array, Array | None]:
    """Zeros for ``W̄`` (in the compute dtype ``dtype``; in the products' dtype, ``w``'s from :func:`_classifier`,
    without :data:`W_BAR_IN_COMPUTE_DTYPE`) and ``b̄`` (in ``dtype``): the member's own (sharded) arrays with a
    group (``Shard.spread``)."""
    dev = device(w)
    w_bar, b_bar = (
        xp.zeros(w.shape, dtype=dtype if W_BAR_IN_COMPUTE_DTYPE else w.dtype, device=dev),
        None if b is None else xp.zeros(b.shape, dtype=dtype, device=dev),
    )
    shard = spec.plan.shard
    if shard is None:
        return w_bar, b_bar
    return shard.spread(w_bar), None if b_bar is None else shard.spread(b_bar)


def _backprop(
    carry: tuple[Array, Array | None], g: Array, h_c: Array, w: Array, hooks: Hooks, xp: Namespace
) -> tuple[tuple[Array, Array | None], Array]:
    """A chunk's ``h̄_c = ḡ @ W`` and its terms of ``W̄`` and ``b̄`` (added to ``carry``); the products in
    ``w``'s dtype (:func:`_classifier`)."""
    w_bar, b_bar = carry
    if b_bar is not None:
        b_bar = b_bar + xp.sum(g, axis=0, dtype=b_bar.dtype)
    g = xp.astype(g, w.dtype, copy=False)
    w_bar = hooks.matmul_add(w_bar, g.T, xp.astype(h_c, w.dtype, copy=False))
    return (w_bar, b_bar), g @ w


def _cast_grads(
    h_bar: Array, carry: tuple[Array, Array | None], h: Array, w: Array, b: Array | None, xp: Namespace, spec: Spec
) -> tuple[Array, Array, Array | None]:
    """The gradients in the inputs' dtypes; ``h̄`` summed over the group of a sharded classifier."""
    if spec.plan.shard is not None:
        h_bar = spec.plan.shard.sum(h_bar)
    w_bar, b_bar = carry
    return (
        xp.astype(h_bar, h.dtype, copy=False),
        xp.astype(w_bar, w.dtype, copy=False),
        None if b is None or b_bar is None else xp.astype(b_bar, b.dtype, copy=False),
    )


def rows(
    h: Array,
    w: Array,
    b: Array | None,
    target: Array,
    weight: Array | None,
    spec: Spec,
    *,
    xp: Namespace,
    hooks: Hooks = PLAIN,
) -> tuple[Array, Array]:
    """Per-row ``(ce, lse)`` in the compute dtype, as :func:`multixent._rows.row_losses` of ``h @ W.T + b``."""
    dtype, wc = _classifier(h, w, b, xp, hooks)

    def body(carry: Any, xs: tuple[Array, ...]) -> tuple[Any, tuple[Array, ...]]:
        h_c, t_c = xs
        z = _logits(h_c, wc, b, dtype, xp, hooks)
        return carry, _rows.row_losses(z, t_c, weight, spec.opts, spec.plan, xp=xp, overwrite=True)

    _, (ce, lse) = hooks.loop(body, None, (h, target), spec.chunk, xp)
    return ce, lse


def rows_vjp(
    h: Array,
    w: Array,
    b: Array | None,
    target: Array,
    weight: Array | None,
    ce_bar: Array,
    lse_bar: Array,
    spec: Spec,
    *,
    xp: Namespace,
    hooks: Hooks = PLAIN,
) -> tuple[Array, Array, Array | None]:
    """``(h̄, W̄, b̄)`` of ``Σ_rows ce_bar·ce + lse_bar·lse``, recomputing each chunk's logits.

    The gradients come in the inputs' dtypes.
    """
    dtype, wc = _classifier(h, w, b, xp, hooks)

    def body(carry: Any, xs: tuple[Array, ...]) -> tuple[Any, tuple[Array, ...]]:
        h_c, t_c, ce_bar_c, lse_bar_c = xs
        z = _logits(h_c, wc, b, dtype, xp, hooks)
        g, _ = _rows.row_losses_vjp(
            z, t_c, weight, None, ce_bar_c, lse_bar_c, spec.opts, spec.plan, xp=xp, overwrite=True
        )
        del z
        carry, h_bar = _backprop(carry, g, h_c, wc, hooks, xp)
        return carry, (h_bar,)

    bars = (xp.astype(ce_bar, dtype, copy=False), xp.astype(lse_bar, dtype, copy=False))
    carry, (h_bar,) = hooks.loop(body, _zero_grads(wc, b, dtype, xp, spec), (h, target, *bars), spec.chunk, xp)
    return _cast_grads(h_bar, carry, h, w, b, xp, spec)


def scalar_loss(ce: Array, lse: Array, ce_scale: Array, lse_scale: Array | None, xp: Namespace) -> Array:
    """``ce_scale·Σce + lse_scale/2·Σlse²``: the "mean"/"sum" loss whose gradient :func:`loss_and_grads` gives."""
    total = ce_scale * xp.sum(ce)
    if lse_scale is None:
        return total
    return total + (lse_scale / 2) * xp.sum(lse * lse)


def loss_and_grads(
    h: Array,
    w: Array,
    b: Array | None,
    target: Array,
    weight: Array | None,
    ce_scale: Array,
    lse_scale: Array | None,
    spec: Spec,
    *,
    xp: Namespace,
    hooks: Hooks = PLAIN,
) -> tuple[tuple[Array, Array], tuple[Array, Array, Array | None]]:
    """Per-row ``(ce, lse)`` and the gradients ``(h̄, W̄, b̄)`` of :func:`scalar_loss` in one pass over the chunks.

    ``lse_scale`` is ``2·z_loss·(z-loss denominator)⁻¹``, or None without z-loss.
    Each chunk's ``ḡ`` comes from :func:`multixent._rows.row_losses_and_grad`.
    """
    dtype, wc = _classifier(h, w, b, xp, hooks)

    def body(carry: Any, xs: tuple[Array, ...]) -> tuple[Any, tuple[Array, ...]]:
        h_c, t_c = xs
        z = _logits(h_c, wc, b, dtype, xp, hooks)
        lse_s = 0.0 if lse_scale is None else lse_scale
        ce, lse, g = hooks.chunk_losses_and_grad(z, t_c, weight, ce_scale, lse_s, spec, xp, wc.dtype)
        del z
        carry, h_bar = _backprop(carry, g, h_c, wc, hooks, xp)
        return carry, (ce, lse, h_bar)

    carry, (ce, lse, h_bar) = hooks.loop(body, _zero_grads(wc, b, dtype, xp, spec), (h, target), spec.chunk, xp)
    return (ce, lse), _cast_grads(h_bar, carry, h, w, b, xp, spec)


def weight_vjp(
    h: Array,
    w: Array,
    b: Array | None,
    target: Array,
    ce_bar: Array,
    spec: Spec,
    *,
    xp: Namespace,
    hooks: Hooks = PLAIN,
) -> Array:
    """``w̄_c = Σ_rows ce_bar·∂ce/∂w_c`` for the class weights ``w``, recomputing each chunk's logits.

    With ``z`` the (softcapped) logits of a counted row and ``y`` its class::

        ∂ce/∂w_c = (1-ε) [c=y] (lse - z_y) + ε/C (lse - z_c)

    (ce is linear in ``w``, so this does not depend on ``w``). The "mean"
    denominator ``Σ w_y`` is the caller's (its ``ce_scale``).
    """
    dtype, wc = _classifier(h, w, b, xp, hooks)
    shard, num_local, eps = spec.plan.shard, w.shape[0], spec.opts.label_smoothing
    num_classes = num_local if shard is None else shard.num_classes
    classes = xp.arange(num_local, dtype=target.dtype, device=device(h))

    def body(acc: Array, xs: tuple[Array, ...]) -> tuple[Any, tuple[Array, ...]]:
        h_c, t_c, ce_bar_c = xs
        may_ignore = spec.plan.may_ignore
        cls = _formulas.class_targets(
            t_c, None, num_classes, spec.opts, xp, may_ignore=may_ignore, shard=shard, num_local=num_local
        )
        z, _ = _formulas.prepare_logits(_logits(h_c, wc, b, dtype, xp, hooks), cls.counted, spec.opts, dtype, xp)
        nll = _formulas.logsumexp(z, axis=-1, keepdims=True, xp=xp, shard=shard) - z  # lse - z_c
        at_y = classes == cls.index[:, None]
        if cls.here is not None:
            at_y = at_y & cls.here[:, None]
        d_w = (eps / num_classes) * nll + xp.where(at_y, (1 - eps) * nll, 0.0)
        return acc + cls.zero_ignored(ce_bar_c, xp) @ d_w, ()

    zero = xp.zeros((num_local,), dtype=dtype, device=device(h))
    zero = zero if shard is None else shard.spread(zero)
    acc, _ = hooks.loop(body, zero, (h, target, xp.astype(ce_bar, dtype, copy=False)), spec.chunk, xp)
    if shard is None:
        return acc
    full = xp.zeros((num_classes,), dtype=dtype, device=device(h))  # the member's slice, then summed
    return shard.sum(xpx.at(full)[shard.offset() + classes].set(acc))
