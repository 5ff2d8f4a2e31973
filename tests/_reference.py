"""An independent float64 reference, written from the formulas (torch's definitions), not from multixent.

``cross_entropy`` and ``nll_loss`` take NumPy arrays (float64, or complex128
for the complex-step derivative) or, with ``xp=jax.numpy``, JAX arrays (for
``jax.grad``/``jax.hessian``/``jax.jvp`` references). They follow torch's
``F.cross_entropy`` written out directly::

    logp = x - logsumexp(x)                                (x softcapped first)
    class index y:  ℓ = -(1-ε) w_y logp_y - ε/C Σ_c w_c logp_c
    probabilities:  ℓ = -Σ_c w_c t'_c logp_c,   t' = (1-ε) t + ε/C   (0·(-inf) = 0)
    z-loss:         + c·lse² on every counted position
    "mean":         Σℓ / Σ_{counted} w_y  (indices) or / positions (probabilities);
                    the z-loss over the counted positions; 0 when a denominator is 0

Ignored positions are replaced by zeros before anything else (so they carry
exactly zero loss and zero derivative whatever they held).

:func:`grad` is the complex-step derivative ``Im f(x + ih)/h`` (h = 1e-30): exact
to rounding (no subtraction, unlike finite differences) for functions built
from analytic operations, as the ones here are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Options:
    """The options of ``cross_entropy`` and their defaults (torch's): the one signature of
    :func:`cross_entropy` here and of :mod:`_native`'s losses (an unknown name is a ``TypeError``)."""

    axis: int = -1
    weight: Any = None
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None


def _as_float(a: Any, xp: Any) -> Any:
    a = xp.asarray(a)
    if xp.iscomplexobj(a):
        return a
    return a.astype(xp.float64)


def _safe_div(a: Any, b: Any, xp: Any) -> Any:
    """``a / b``, and 0 where ``b`` is 0."""
    return xp.where(b == 0, 0.0, a / xp.where(b == 0, 1.0, b))


def logsumexp_rows(z: Any, xp: Any = np) -> Any:
    """``log Σ_c exp(z_c)`` of each row of 2-D ``z``; shifted by the row's real finite maximum."""
    if z.shape[0] == 0:
        return xp.zeros((0,), dtype=z.dtype)
    m = xp.max(xp.real(z), axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0.0)
    return xp.log(xp.sum(xp.exp(z - m), axis=-1)) + m[:, 0]


def _rows(x: Any, axis: int, xp: Any) -> tuple[Any, tuple[int, ...]]:
    """(rows, C) with the class axis last, and the batch shape."""
    moved = xp.moveaxis(x, axis, -1)
    return xp.reshape(moved, (-1, x.shape[axis])), tuple(moved.shape[:-1])


def cross_entropy(x: Any, t: Any, *, xp: Any = np, **options: Any) -> Any:
    """The loss of :class:`Options` ``options``."""
    o = Options(**options)
    ignore_index, softcap, z_loss, reduction = o.ignore_index, o.softcap, o.z_loss, o.reduction
    x = _as_float(x, xp)
    t = xp.asarray(t)
    classes = x.shape[o.axis]
    eps = o.label_smoothing
    w = xp.ones(classes) if o.weight is None else _as_float(o.weight, xp)
    z, batch_shape = _rows(x, o.axis, xp)
    if xp.issubdtype(t.dtype, xp.integer):
        y = xp.reshape(t, (-1,))
        counted = y != ignore_index
        y = xp.where(counted, y, 0)
        z = xp.where(counted[:, None], z, 0.0)
        if softcap is not None:
            z = softcap * xp.tanh(z / softcap)
        lse = logsumexp_rows(z, xp)
        logp = z - lse[:, None]
        w_y = w[y]
        logp_y = xp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
        ce = -(1.0 - eps) * w_y * logp_y
        if eps:
            ce = ce - eps / classes * xp.sum(w * logp, axis=-1)
        ce = xp.where(counted, ce, 0.0)
        ce_den = xp.sum(xp.where(counted, w_y, 0.0))
    else:
        p, _ = _rows(_as_float(t, xp), o.axis, xp)
        counted = xp.ones(p.shape[0], dtype=bool)
        if softcap is not None:
            z = softcap * xp.tanh(z / softcap)
        lse = logsumexp_rows(z, xp)
        logp = z - lse[:, None]
        if eps:
            p = (1.0 - eps) * p + eps / classes
        a = p * w
        # 0·(-inf) is taken as 0; elsewhere a·logp as is (so ∂/∂a = logp also where a = 0)
        ce = -xp.sum(a * xp.where((a == 0) & xp.isinf(logp), 0.0, logp), axis=-1)
        ce_den = xp.asarray(float(p.shape[0]))
    lse2 = xp.where(counted, lse, 0.0) ** 2
    if reduction == "none":
        return xp.reshape(ce + z_loss * lse2 if z_loss else ce, batch_shape)
    if reduction == "sum":
        total = xp.sum(ce)
        return total + z_loss * xp.sum(lse2) if z_loss else total
    assert reduction == "mean"
    total = _safe_div(xp.sum(ce), ce_den, xp)
    if not z_loss:
        return total
    return total + z_loss * _safe_div(xp.sum(lse2), xp.sum(xp.where(counted, 1.0, 0.0)), xp)


def nll_loss(
    log_probs: Any,
    t: Any,
    *,
    axis: int = -1,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    xp: Any = np,
) -> Any:
    lp, batch_shape = _rows(_as_float(log_probs, xp), axis, xp)
    w = xp.ones(lp.shape[-1]) if weight is None else _as_float(weight, xp)
    y = xp.reshape(xp.asarray(t), (-1,))
    counted = y != ignore_index
    y = xp.where(counted, y, 0)
    lp = xp.where(counted[:, None], lp, 0.0)
    w_y = xp.where(counted, w[y], 0.0)
    per = -w_y * xp.take_along_axis(lp, y[:, None], axis=-1)[:, 0]
    if reduction == "none":
        return xp.reshape(per, batch_shape)
    if reduction == "sum":
        return xp.sum(per)
    return _safe_div(xp.sum(per), xp.sum(w_y), xp)


def grad(f: Callable[[np.ndarray], Any], x: np.ndarray, *, h: float = 1e-30) -> np.ndarray:
    """``∂f/∂x`` of a real scalar function by the complex step, exact to rounding."""
    x = np.asarray(x, dtype=np.float64)
    base = x.astype(np.complex128).ravel()
    out = np.zeros(x.size)
    for i in range(x.size):
        z = base.copy()
        z[i] += 1j * h
        out[i] = np.imag(f(z.reshape(x.shape))) / h
    return out.reshape(x.shape)


def _summed(loss: Any, upstream: np.ndarray | None) -> Any:
    """The scalar whose derivative is taken: the loss, or ``Σ upstream·loss`` (reduction "none")."""
    return loss if upstream is None else np.sum(upstream * loss)


def cross_entropy_grad(
    x: np.ndarray, t: np.ndarray, *, upstream: np.ndarray | None = None, **options: Any
) -> np.ndarray:
    """``∂/∂x`` of the loss (of ``Σ upstream·loss`` for reduction "none")."""
    return grad(lambda z: _summed(cross_entropy(z, t, **options), upstream), x)


def cross_entropy_target_grad(
    x: np.ndarray, t: np.ndarray, *, upstream: np.ndarray | None = None, **options: Any
) -> np.ndarray:
    """``∂/∂t`` of the loss for probability targets."""
    return grad(lambda p: _summed(cross_entropy(x, p, **options), upstream), t)
