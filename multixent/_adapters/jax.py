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
