"""The fused, chunked linear cross-entropy: ``cross_entropy(hidden @ classifier.T + bias, target)``.

Rows are processed in chunks of ``chunk`` rows, so that only one chunk's logits
``z = h_c @ W.T + b`` (``chunk × V``) exist at a time. Each chunk's logits go
through the row functions of :mod:`multixent._math` (the same forward and
closed-form gradient as :func:`multixent.cross_entropy`); this module only adds
the three matrix products around them::

    z   = h_c @ W.T + b         (per chunk)
    ḡ   = ∂loss/∂z              (closed form, per chunk, from _math)
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

Nothing here names a framework; an adapter may pass :class:`Hooks` (an
in-place ``acc += a @ b``; a compiled loop over the chunks) and
``Spec.block_rows`` (cache blocking inside a chunk).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from array_api_compat import device

from . import _adapters, _checks, _loss, _math

Array = Any
Namespace = Any

#: Logits elements per chunk when ``chunk_size`` is None: ``chunk = max(1,
#: CHUNK_ELEMENTS // V)`` rows. 2**23 elements are 32 MiB in float32. Eager
#: backends overwrite a chunk's logits with its gradient, block by block (the
#: logits are its only chunk-sized array); XLA fuses the chunk. Measured at
#: N=8192, D=512, V=32768 fp32 (forward+backward, nox -s bench on 09ffc66):
#: extra memory 0.11x the full logits on torch (0.58x the naive time), 0.17x
#: on JAX (1.03x). Larger chunks are faster (fewer passes over the classifier
#: and its gradient, larger matrix products) and hold more memory.
CHUNK_ELEMENTS = 2**23


@dataclass(frozen=True)
class Spec:
    """The static (hashable) part of one call: options and chunking."""

    opts: _math.Options
    chunk: int  # rows per chunk
    block_rows: int | None = None  # rows per cache block inside a chunk (None: the whole chunk)


def default_chunk(rows: int, num_classes: int) -> int:
    """Rows per chunk for ``chunk_size=None`` (see :data:`CHUNK_ELEMENTS`)."""
    return max(1, min(max(rows, 1), CHUNK_ELEMENTS // max(num_classes, 1)))


def _add(acc: Array, a: Array, b: Array) -> Array:
    return acc + a @ b


Body = Callable[[Any, tuple[Array, ...]], tuple[Any, tuple[Array, ...]]]


def _loop(body: Body, carry: Any, xs: tuple[Array, ...], chunk: int, xp: Namespace) -> tuple[Any, tuple[Array, ...]]:
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


@dataclass(frozen=True)
class Hooks:
    """Framework-supplied primitives; the defaults are plain array-API code."""

    #: ``acc + a @ b``, possibly updating ``acc`` in place.
    matmul_add: Callable[[Array, Array, Array], Array] = _add
    #: ``loop(body, carry, xs, chunk, xp)`` as :func:`_loop`. JAX passes a
    #: ``lax.scan``: an unrolled Python loop lets XLA schedule every chunk's
    #: logits at once (all the memory the chunking saves) and compiles slowly.
    loop: Callable[[Body, Any, tuple[Array, ...], int, Namespace], tuple[Any, tuple[Array, ...]]] = _loop


PLAIN = Hooks()


def _logits(h: Array, w: Array, b: Array | None, dtype: Any, xp: Namespace) -> Array:
    """One chunk's logits in the compute dtype."""
    z = xp.astype(h, dtype, copy=False) @ w.T
    return z if b is None else z + b


def _dtype(h: Array, w: Array, b: Array | None, xp: Namespace) -> Any:
    dtypes = (h.dtype, w.dtype) if b is None else (h.dtype, w.dtype, b.dtype)
    return _math.compute_dtype(xp.result_type(*dtypes), xp)


def _zero_grads(w: Array, b: Array | None, dtype: Any, xp: Namespace) -> tuple[Array, Array | None]:
    dev = device(w)
    return xp.zeros(w.shape, dtype=dtype, device=dev), None if b is None else xp.zeros(b.shape, dtype=dtype, device=dev)


def _backprop(
    carry: tuple[Array, Array | None], g: Array, h_c: Array, w: Array, hooks: Hooks, xp: Namespace
) -> tuple[tuple[Array, Array | None], Array]:
    """A chunk's ``h̄_c = ḡ @ W`` and its terms of ``W̄`` and ``b̄`` (added to ``carry``)."""
    w_bar, b_bar = carry
    w_bar = hooks.matmul_add(w_bar, g.T, xp.astype(h_c, g.dtype, copy=False))
    if b_bar is not None:
        b_bar = b_bar + xp.sum(g, axis=0)
    return (w_bar, b_bar), g @ w


def _cast_grads(
    h_bar: Array, carry: tuple[Array, Array | None], h: Array, w: Array, b: Array | None, xp: Namespace
) -> tuple[Array, Array, Array | None]:
    """The gradients in the inputs' dtypes."""
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
    """Per-row ``(ce, lse)`` in the compute dtype, as :func:`multixent._math.row_losses` of ``h @ W.T + b``."""
    dtype = _dtype(h, w, b, xp)
    wc = xp.astype(w, dtype, copy=False)

    def body(carry: Any, xs: tuple[Array, ...]) -> tuple[Any, tuple[Array, ...]]:
        h_c, t_c = xs
        z = _logits(h_c, wc, b, dtype, xp)
        return carry, _math.row_losses(z, t_c, weight, spec.opts, xp=xp, block_rows=spec.block_rows, overwrite=True)

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
    dtype = _dtype(h, w, b, xp)
    wc = xp.astype(w, dtype, copy=False)

    def body(carry: Any, xs: tuple[Array, ...]) -> tuple[Any, tuple[Array, ...]]:
        h_c, t_c, ce_bar_c, lse_bar_c = xs
        z = _logits(h_c, wc, b, dtype, xp)
        g, _ = _math.row_losses_vjp(
            z, t_c, weight, None, ce_bar_c, lse_bar_c, spec.opts, xp=xp, block_rows=spec.block_rows, overwrite=True
        )
        del z
        carry, h_bar = _backprop(carry, g, h_c, wc, hooks, xp)
        return carry, (h_bar,)

    bars = (xp.astype(ce_bar, dtype, copy=False), xp.astype(lse_bar, dtype, copy=False))
    carry, (h_bar,) = hooks.loop(body, _zero_grads(w, b, dtype, xp), (h, target, *bars), spec.chunk, xp)
    return _cast_grads(h_bar, carry, h, w, b, xp)


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
    Each chunk's ``ḡ`` comes from :func:`multixent._math.row_losses_and_grad`.
    """
    dtype = _dtype(h, w, b, xp)
    wc = xp.astype(w, dtype, copy=False)

    def body(carry: Any, xs: tuple[Array, ...]) -> tuple[Any, tuple[Array, ...]]:
        h_c, t_c = xs
        z = _logits(h_c, wc, b, dtype, xp)
        ce, lse, g = _math.row_losses_and_grad(
            z,
            t_c,
            weight,
            ce_scale,
            0.0 if lse_scale is None else lse_scale,
            spec.opts,
            xp=xp,
            block_rows=spec.block_rows,
            overwrite=True,
        )
        del z
        carry, h_bar = _backprop(carry, g, h_c, wc, hooks, xp)
        return carry, (ce, lse, h_bar)

    carry, (ce, lse, h_bar) = hooks.loop(body, _zero_grads(w, b, dtype, xp), (h, target), spec.chunk, xp)
    return (ce, lse), _cast_grads(h_bar, carry, h, w, b, xp)


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
    dtype = _dtype(h, w, b, xp)
    wc = xp.astype(w, dtype, copy=False)
    num_classes, eps = w.shape[0], spec.opts.label_smoothing
    classes = xp.arange(num_classes, dtype=target.dtype, device=device(h))

    def body(acc: Array, xs: tuple[Array, ...]) -> tuple[Any, tuple[Array, ...]]:
        h_c, t_c, ce_bar_c = xs
        cls = _math.class_targets(t_c, None, num_classes, spec.opts, xp)
        z, _ = _math._prepare_logits(_logits(h_c, wc, b, dtype, xp), cls.counted, spec.opts, dtype, xp)
        nll = _math.logsumexp(z, axis=-1, keepdims=True, xp=xp) - z  # lse - z_c
        d_w = (eps / num_classes) * nll + xp.where(classes == cls.index[:, None], (1 - eps) * nll, 0.0)
        return acc + cls.mask(ce_bar_c, xp) @ d_w, ()

    zero = xp.zeros((num_classes,), dtype=dtype, device=device(h))
    acc, _ = hooks.loop(body, zero, (h, target, xp.astype(ce_bar, dtype, copy=False)), spec.chunk, xp)
    return acc


# --------------------------------------------------------------------------
# The public function


def _check_shapes(hidden: Array, classifier: Array, bias: Array | None, target: Array) -> tuple[int, int]:
    """``(V, D)``; ValueError naming the shapes that do not fit."""
    h_shape, w_shape = tuple(hidden.shape), tuple(classifier.shape)
    if len(h_shape) < 1:
        raise ValueError(f"multixent: hidden must have at least one dimension (..., D); got shape {h_shape}")
    if len(w_shape) != 2:
        raise ValueError(f"multixent: classifier must have shape (V, D); got shape {w_shape}")
    num_classes, dim = w_shape
    if h_shape[-1] != dim:
        raise ValueError(
            f"multixent: hidden of shape {h_shape} does not fit classifier of shape {w_shape}: "
            f"hidden's last dimension ({h_shape[-1]}) must equal the classifier's second ({dim})"
        )
    if num_classes == 0:
        raise ValueError(f"multixent: classifier of shape {w_shape} has zero classes")
    if bias is not None and tuple(bias.shape) != (num_classes,):
        raise ValueError(
            f"multixent: bias of shape {tuple(bias.shape)} does not fit classifier of shape {w_shape}; "
            f"expected ({num_classes},)"
        )
    if tuple(target.shape) != h_shape[:-1]:
        raise ValueError(
            f"multixent: target of shape {tuple(target.shape)} does not fit hidden of shape {h_shape}; "
            f"expected {h_shape[:-1]} (hidden's shape without its last dimension)"
        )
    return num_classes, dim


def _check_chunk_size(chunk_size: Any) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"multixent: chunk_size must be a positive int or None; got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"multixent: chunk_size must be a positive int or None; got {chunk_size}")
    return chunk_size


def linear_cross_entropy(
    hidden: Array,
    classifier: Array,
    target: Array,
    /,
    *,
    bias: Array | None = None,
    chunk_size: int | None = None,
    weight: Array | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> Array:
    r"""``cross_entropy(hidden @ classifier.T + bias, target, ...)`` without materialising the logits.

    ``hidden`` is ``(..., D)``, ``classifier`` ``(V, D)`` (the layout of
    ``torch.nn.Linear.weight``), ``bias`` ``(V,)`` or None, ``target`` the
    class indices ``(...)``; the options are those of
    :func:`multixent.cross_entropy`. The value, and the gradients with respect
    to ``hidden``, ``classifier`` and ``bias`` (through torch autograd and JAX
    autodiff), equal the naive path's.

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
    The torch backward is not itself differentiable (``create_graph``); a
    second ``backward`` through a retained graph works.
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

    Example::

        >>> import numpy as np, multixent
        >>> h = np.array([[1.0, 0.0], [0.0, 2.0]]); W = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> y = np.array([0, 2])
        >>> loss = multixent.linear_cross_entropy(h, W, y)
        >>> bool(np.isclose(loss, multixent.cross_entropy(h @ W.T, y)))
        True
    """
    opts, z = _loss._options(ignore_index, label_smoothing, z_loss, softcap)
    xp = _checks.namespace(hidden, classifier, target, bias, weight)
    _checks.floating(hidden, "hidden", xp)
    _checks.floating(classifier, "classifier", xp)
    if bias is not None:
        _checks.floating(bias, "bias", xp)
    if not _checks.index_target(target, xp):
        raise TypeError(f"multixent: linear_cross_entropy takes class indices (an integer target); got {target.dtype}")
    num_classes, dim = _check_shapes(hidden, classifier, bias, target)
    chunk_size = _check_chunk_size(chunk_size)
    reduction = _checks.reduction(reduction)
    _checks.ignore_index(ignore_index, True, -100)
    _checks.weight(weight, num_classes, xp)
    adapter = _adapters.adapter_for(hidden)
    values = adapter.concrete(target)
    if values is not None:
        opts = dataclasses.replace(opts, may_ignore=_checks.class_indices(values, num_classes, ignore_index))

    dtype = _dtype(hidden, classifier, bias, xp)
    out_dtype = adapter.linear_out_dtype(xp.result_type(hidden.dtype, classifier.dtype), hidden)
    h = xp.reshape(hidden, (math.prod(hidden.shape[:-1]), dim))  # not -1: D may be 0
    t = xp.reshape(target, (-1,))
    if weight is not None:
        weight = xp.astype(weight, dtype)
    n_rows = h.shape[0]
    chunk = default_chunk(n_rows, num_classes) if chunk_size is None else min(chunk_size, max(n_rows, 1))
    # _reduce and _denominators read only the row count of call.rows: hidden's rows stand in for the logits
    counted = t != ignore_index if opts.may_ignore else None
    call = _loss._Call(xp, h, t, weight, counted, tuple(hidden.shape[:-1]), -1, True, reduction, opts, adapter)

    with adapter.quiet():
        if reduction == "none":
            ce, lse = adapter.linear_rows(h, classifier, bias, t, weight, opts, chunk, xp)
            return _loss._reduce(call, ce, lse, z, out_dtype)
        one = xp.asarray(1.0, dtype=dtype, device=device(h))
        ce_scale, z_scale = one, one
        if reduction == "mean":
            ce_count, z_count = _loss._denominators(call, dtype)
            ce_scale, z_scale = _loss._mean(one, ce_count, xp), _loss._mean(one, z_count, xp)
        lse_scale = (2.0 * z) * z_scale if z else None
        loss = adapter.linear_scalar(h, classifier, bias, t, weight, ce_scale, lse_scale, opts, chunk, xp)
        return xp.astype(loss, out_dtype, copy=False)
