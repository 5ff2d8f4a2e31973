"""JAX adapter: the generic forward with a ``custom_jvp`` built from the closed-form gradient.

A JVP rule (not a VJP) keeps forward mode, ``jax.hessian`` and ``vmap``
working; JAX transposes it for reverse mode. The rule's tangent is the row-wise
dot of the tangent with the closed-form gradient matrices, which XLA fuses into
one pass under ``jit``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from array_api_compat import array_namespace

from .. import _math


def concrete(a: Any) -> Any:
    """A NumPy copy of a concrete array (operations on it inside ``jit`` would be traced)."""
    return None if isinstance(a, jax.core.Tracer) else np.asarray(a)


def blocking(x: Any, opts: _math.Options) -> tuple[int | None, _math.Options]:
    """One block: XLA fuses the whole computation."""
    return None, opts


@partial(jax.custom_jvp, nondiff_argnums=(3,))
def _row_losses(x: Any, target: Any, weight: Any, opts: _math.Options) -> tuple[Any, Any]:
    return _math.row_losses(x, target, weight, opts, xp=array_namespace(x))


@_row_losses.defjvp
def _row_losses_jvp(opts: _math.Options, primals: Any, tangents: Any) -> Any:
    x, target, weight = primals
    x_dot, target_dot, _ = tangents  # no derivative with respect to the class weights (as torch)
    xp = array_namespace(x)
    ce, lse = _math.row_losses(x, target, weight, opts, xp=xp)
    ones, zeros = jnp.ones_like(ce), jnp.zeros_like(ce)
    probs_target = jnp.issubdtype(target.dtype, jnp.floating)
    g_ce, g_t = _math.row_losses_vjp(x, target, weight, lse, ones, zeros, opts, xp=xp, target_grad=probs_target)
    g_lse, _ = _math.row_losses_vjp(x, target, weight, lse, zeros, ones, opts, xp=xp)
    ce_dot = jnp.sum(g_ce * x_dot, axis=-1, dtype=ce.dtype)
    if probs_target:
        ce_dot = ce_dot + jnp.sum(g_t * target_dot, axis=-1, dtype=ce.dtype)
    lse_dot = jnp.sum(g_lse * x_dot, axis=-1, dtype=lse.dtype)
    return (ce, lse), (ce_dot, lse_dot)


def row_losses(x: Any, target: Any, weight: Any, opts: _math.Options, xp: Any) -> tuple[Any, Any]:
    return _row_losses(x, target, weight, opts)


# --------------------------------------------------------------------------
# linear_cross_entropy: custom_vjp rules (reverse mode; forward mode is not
# defined). "mean"/"sum" compute the gradients in the forward pass and scale
# them by the incoming scalar; "none" recomputes each chunk in the backward.


@partial(jax.custom_vjp, nondiff_argnums=(7,))
def _linear_scalar(h: Any, w: Any, b: Any, t: Any, weight: Any, ce_s: Any, lse_s: Any, spec: Any) -> Any:
    from .. import _linear

    xp = array_namespace(h)
    ce, lse = _linear.rows(h, w, b, t, weight, spec, xp=xp)
    return _linear.scalar_loss(ce, lse, ce_s, lse_s, xp)


def _linear_scalar_fwd(h: Any, w: Any, b: Any, t: Any, weight: Any, ce_s: Any, lse_s: Any, spec: Any) -> Any:
    from .. import _linear

    return _linear.loss_and_grads(h, w, b, t, weight, ce_s, lse_s, spec, xp=array_namespace(h))


def _linear_scalar_bwd(spec: Any, grads: Any, g: Any) -> Any:
    scaled = tuple(None if s is None else (s * g).astype(s.dtype) for s in grads)
    return (*scaled, None, None, None, None)


_linear_scalar.defvjp(_linear_scalar_fwd, _linear_scalar_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _linear_rows(h: Any, w: Any, b: Any, t: Any, weight: Any, spec: Any) -> Any:
    from .. import _linear

    return _linear.rows(h, w, b, t, weight, spec, xp=array_namespace(h))


def _linear_rows_fwd(h: Any, w: Any, b: Any, t: Any, weight: Any, spec: Any) -> Any:
    ce, lse = _linear_rows(h, w, b, t, weight, spec)
    return (ce, lse), (h, w, b, t, weight, lse)


def _linear_rows_bwd(spec: Any, res: Any, bars: Any) -> Any:
    from .. import _linear

    h, w, b, t, weight, lse = res
    ce_bar, lse_bar = bars
    dh, dw, db = _linear.rows_vjp(h, w, b, t, weight, lse, ce_bar, lse_bar, spec, xp=array_namespace(h))
    return dh, dw, db, None, None


_linear_rows.defvjp(_linear_rows_fwd, _linear_rows_bwd)


def linear_rows(h: Any, w: Any, b: Any, target: Any, weight: Any, opts: _math.Options, chunk: int, xp: Any) -> Any:
    from .. import _linear

    return _linear_rows(h, w, b, target, weight, _linear.Spec(opts, chunk))


def linear_scalar(
    h: Any, w: Any, b: Any, target: Any, weight: Any, ce_scale: Any, lse_scale: Any, opts: _math.Options, chunk: int, xp: Any
) -> Any:
    from .. import _linear

    return _linear_scalar(h, w, b, target, weight, ce_scale, lse_scale, _linear.Spec(opts, chunk))
