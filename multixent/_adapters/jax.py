"""JAX adapter: the generic forward with a ``custom_jvp`` built from the closed-form gradient.

A JVP rule (not a VJP) keeps forward mode, ``jax.hessian`` and ``vmap``
working; JAX transposes it for reverse mode. The rule (``_rows.row_losses_jvp``,
with the class weights' tangent too: their true derivative)
computes the forward and the tangent in one block sharing ``exp(z - m)``, so
under ``jit`` XLA computes the exponential once and writes the gradient into its
buffer (1.0x the logits' bytes). ``linear_cross_entropy`` uses a ``custom_vjp``
(its gradients are computed in the forward).
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from array_api_compat import array_namespace
from jax.custom_derivatives import SymbolicZero

from .. import _compat, _formulas, _linear, _rows

#: Floating-point errors never warn here.
quiet = contextlib.nullcontext


#: NumPy arrays and Python numbers beside JAX arrays become JAX arrays, as in every ``jnp`` function.
NUMPY_INPUTS: bool | str = True


def scalar(a: Any) -> float | None:
    """A concrete option's value; None for a tracer (``jit``, ``grad``: the option stays an array)."""
    return None if isinstance(a, jax.core.Tracer) else float(a)


def concrete(a: Any, in_group: bool = False) -> Any:
    """A NumPy copy of a concrete array (operations on it inside ``jit`` would be traced); None for
    one on an accelerator unless ``MULTIXENT_SYNC_CHECKS=1`` (no host read: an out-of-range index
    gives NaN there, as under ``jit``). ``in_group`` changes nothing: JAX's groups are traced (``shard_map``)."""
    if isinstance(a, jax.core.Tracer):
        return None
    if isinstance(a, jax.Array) and not _compat.SYNC_CHECKS and any(d.platform != "cpu" for d in a.devices()):
        return None
    return np.asarray(a)


def plan(x: Any, *inputs: Any, may_ignore: bool, differentiable: bool = False, shard: Any = None) -> _rows.Plan:
    """One block, out of place: XLA fuses the whole computation; the row max's shift is not differentiated."""
    stop = jax.lax.stop_gradient if differentiable else None
    return _rows.Plan(may_ignore=may_ignore, stop_gradient=stop, shard=shard)


def shard(axis: str | tuple[str, ...], class_offset: Any, num_local: int, arrays: tuple[Any, ...]) -> _formulas.Shard:
    """The class axis split over the mesh axis (or axes) ``axis`` inside ``jax.shard_map``: equal shards,
    member ``i`` (``lax.axis_index``) holding classes ``[i·C_local, (i+1)·C_local)``; ``lax.pmax`` and
    ``lax.psum`` across them. The gradients rely on ``shard_map``'s replication types (its default
    ``check_vma=True``): a ``psum``'s cotangent is then not summed again."""
    if class_offset is not None:
        raise ValueError(
            f"multixent: class_offset applies to torch process groups; inside jax.shard_map the shards over "
            f"{axis!r} are equal and member i holds classes [i*C_local, (i+1)*C_local)"
        )
    others = sorted({type(a).__module__ for a in arrays if a is not None and not isinstance(a, jax.Array)})
    if others:
        raise TypeError(f"multixent: group={axis!r} is a JAX mesh axis; the arrays must be JAX arrays, got {others}")
    try:
        size = jax.lax.axis_size(axis)
    except NameError as err:
        raise ValueError(
            f"multixent: group={axis!r} is not a mesh axis bound here: call inside jax.shard_map over it ({err})"
        ) from None
    _check_split(axis, arrays[0])
    return _formulas.Shard(
        num_classes=size * num_local,
        offset=lambda: jax.lax.axis_index(axis) * num_local,
        max=lambda a: jax.lax.pmax(jax.lax.stop_gradient(a), axis),  # type: ignore[no-untyped-call]
        sum=lambda a: jax.lax.psum(a, axis),  # type: ignore[no-untyped-call]
        spread=lambda a: jax.lax.pcast(a, axis, to="varying"),
        agree=partial(_raise, axis, sorted(_varying(arrays[0]) - _axes(axis)), (num_local, size)),
    )


def _axes(axis: str | tuple[str, ...]) -> set[str]:
    return {axis} if isinstance(axis, str) else set(axis)


def _raise(axis: str | tuple[str, ...], beyond: list[str], sizes: tuple[int, int], error: BaseException | None) -> None:
    """The local error (every device traces alike). A target out of range while the class-split array
    also varies over mesh axes ``beyond`` the group's: its class axis may be split over them too, which
    the group must then name (inside ``shard_map`` nothing tells which array axis a mesh axis splits)."""
    if error is None:
        return
    if isinstance(error, IndexError) and beyond:
        names = (axis,) if isinstance(axis, str) else axis
        raise IndexError(
            f"{error}; C = {sizes[0]} local classes x {sizes[1]} members of group={axis!r}, but the class-split "
            f"array (the logits, or linear_cross_entropy's classifier) also varies over mesh axis "
            f"{', '.join(map(repr, beyond))}, which the group does not name: if its class axis is split over "
            f"{'that axis' if len(beyond) == 1 else 'those axes'} too, name every axis it is split over, "
            f"group={(*names, *beyond)!r}"
        ) from None
    raise error


def _varying(a: Any) -> frozenset[str]:
    """The mesh axes ``a``'s value varies over inside ``jax.shard_map`` (its replication type)."""
    aval = jax.typeof(a)
    mat = getattr(aval, "manual_axis_type", None)  # JAX >= 0.9; earlier releases name it ``vma``
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _check_split(axis: str | tuple[str, ...], split: Any) -> None:
    """``split`` (the logits, or the classifier) must hold a different class shard on each member of
    ``axis``: logits replicated over it would count every class ``size`` times. shard_map's replication
    types say which (``axis_index`` varies over ``axis`` exactly when they are on, ``check_vma=True``).
    Without them that cannot be checked and a ``psum``'s cotangent is summed again (the classifier's
    gradient comes out wrong), so ``check_vma=False`` is refused."""
    axes = _axes(axis)
    if not axes <= _varying(jax.lax.axis_index(axis)):
        raise ValueError(
            f"multixent: group={axis!r} needs jax.shard_map's replication types (its default check_vma=True); "
            "with check_vma=False JAX does not track which values are replicated, and some gradients (e.g. "
            "linear_cross_entropy's classifier) would come out wrong"
        )
    replicated = sorted(axes - _varying(split))
    if replicated:
        raise ValueError(
            f"multixent: group={axis!r}: the class-split array (the logits, or linear_cross_entropy's classifier) "
            f"is replicated over mesh axis {', '.join(map(repr, replicated))}, so no member holds its own class "
            f"shard; split its class axis with the shard_map in_specs (e.g. P(None, {axis!r})), or drop group= "
            "for replicated logits"
        )


@partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _row_losses(x: Any, target: Any, weight: Any, opts: _formulas.Options, plan: _rows.Plan) -> tuple[Any, Any]:
    return _rows.row_losses(x, target, weight, opts, plan, xp=array_namespace(x))


def _row_losses_jvp(opts: _formulas.Options, plan: _rows.Plan, primals: Any, tangents: Any) -> Any:
    x, target, weight = primals
    # symbolic zeros (inputs not differentiated, integer targets) cost nothing
    x_dot, target_dot, weight_dot = (None if isinstance(t, SymbolicZero) else t for t in tangents)
    if not jnp.issubdtype(target.dtype, jnp.floating):
        target_dot = None
    ce, lse, ce_dot, lse_dot = _rows.row_losses_jvp(
        x, target, weight, x_dot, target_dot, opts, plan, xp=array_namespace(x), weight_dot=weight_dot
    )
    return (ce, lse), (ce_dot, lse_dot)


_row_losses.defjvp(_row_losses_jvp, symbolic_zeros=True)


#: The same, compiled once per shapes, dtypes and options: an eager call (no tracer among
#: the arrays) is then one dispatch, not one per operation.
_row_losses_compiled = jax.jit(_row_losses, static_argnums=(3, 4))


def row_losses(
    x: Any,
    target: Any,
    weight: Any,
    opts: _formulas.Options,
    may_ignore: bool,
    xp: Any,
    shard: Any = None,
    need_lse: bool = True,
) -> tuple[Any, Any]:
    """``need_lse`` changes nothing: under ``jit`` XLA drops an unused ``lse``."""
    how = plan(x, may_ignore=may_ignore, differentiable=True, shard=shard)
    if opts.arrays:  # traced options: JAX differentiates the math itself (no custom rule), options included;
        # with a group too: shard_map's replication types sum the options' per-member cotangents
        return _rows.row_losses(x, target, weight, opts.astype(_formulas.compute_dtype(x.dtype, xp), xp), how, xp=xp)
    if shard is not None or any(isinstance(a, jax.core.Tracer) for a in (x, target, weight)):
        return _row_losses(x, target, weight, opts, how)
    return _row_losses_compiled(x, target, weight, opts, how)  # eager, float options, no group


def fused(x: Any, target: Any, weight: Any, loss: Any) -> Any:
    """None: the custom_jvp shares ``exp(z - m)`` between the loss and its gradient already."""
    return None


# --------------------------------------------------------------------------
# linear_cross_entropy: custom_vjp rules (reverse mode; forward mode is not
# defined). "mean"/"sum" compute the gradients in the forward pass and scale
# them by the incoming scalar; "none" recomputes each chunk in the backward.


def _scan_chunks(body: Any, carry: Any, xs: Any, chunk: int, xp: Any) -> Any:
    """The chunk loop as one ``lax.scan`` over the whole chunks, then the remainder.

    Step ``i`` takes rows ``i, i + full, i + 2·full, …``: rows sharded over
    devices (``NamedSharding``) stay sharded within every step, where
    contiguous chunks would put whole steps on one device and XLA would
    all-gather the hidden states and repeat every chunk on every device.
    """
    rows = xs[0].shape[0]
    full = rows // chunk
    if full <= 1:
        return _linear.chunk_loop(body, carry, xs, chunk, xp)
    stacked = tuple(jnp.swapaxes(jnp.reshape(x[: full * chunk], (chunk, full, *x.shape[1:])), 0, 1) for x in xs)
    carry, outs = jax.lax.scan(body, carry, stacked)
    outs = tuple(jnp.reshape(jnp.swapaxes(o, 0, 1), (full * chunk, *o.shape[2:])) for o in outs)
    if rows == full * chunk:
        return carry, outs
    carry, rest = body(carry, tuple(x[full * chunk :] for x in xs))
    return carry, tuple(jnp.concatenate([o, r]) for o, r in zip(outs, rest, strict=True))


def _matmul_to(a: Any, b: Any, dtype: Any) -> Any:
    """``a @ b`` of half-precision operands, accumulated and returned in ``dtype``
    (:attr:`multixent._linear.Hooks.matmul_to`): ``preferred_element_type``, one product on the operands as they
    are (a GPU's tensor cores), no copy of them in ``dtype``."""
    return jnp.matmul(a, b, preferred_element_type=dtype)


def _matmul_add(acc: Any, a: Any, b: Any) -> Any:
    """``acc + a @ b`` with the product accumulated in ``acc``'s dtype (:attr:`multixent._linear.Hooks.matmul_add`)."""
    return acc + jnp.matmul(a, b, preferred_element_type=acc.dtype)


#: The chunks in a ``lax.scan``; the products on the inputs' own dtype, summed in the compute dtype (on the CPU,
#: XLA converts the operands itself).
_HOOKS = _linear.Hooks(loop=_scan_chunks, matmul_to=_matmul_to, matmul_add=_matmul_add)


@partial(jax.custom_vjp, nondiff_argnums=(7,))
def _linear_scalar(h: Any, w: Any, b: Any, t: Any, weight: Any, ce_s: Any, lse_s: Any, spec: Any) -> Any:
    xp = array_namespace(h)
    ce, lse = _linear.rows(h, w, b, t, weight, spec, xp=xp, hooks=_HOOKS)
    return _linear.scalar_loss(ce, lse, ce_s, lse_s, xp)


def _linear_scalar_fwd(h: Any, w: Any, b: Any, t: Any, weight: Any, ce_s: Any, lse_s: Any, spec: Any) -> Any:
    xp = array_namespace(h)
    (ce, lse), grads = _linear.loss_and_grads(h, w, b, t, weight, ce_s, lse_s, spec, xp=xp, hooks=_HOOKS)
    loss = _linear.scalar_loss(ce, lse, ce_s, lse_s, xp)
    # the weight's and ce_scale's cotangents (under jit, XLA drops them when unused)
    lse_sq = None if lse_s is None else jnp.sum(lse * lse) / 2
    return loss, (grads, (h, w, b, t, ce_s, weight), jnp.sum(ce), lse_sq)


def _linear_scalar_bwd(spec: Any, res: Any, g: Any) -> Any:
    grads, inputs, ce_sum, lse_sq = res
    scaled = tuple(None if s is None else (s * g).astype(s.dtype) for s in grads)
    h, w, b, t, ce_s, weight = inputs
    weight_bar = None if weight is None else _weight_vjp(h, w, b, t, jnp.broadcast_to(g * ce_s, t.shape), spec, weight)
    return (*scaled, None, weight_bar, (g * ce_sum).astype(ce_s.dtype), None if lse_sq is None else g * lse_sq)


def _weight_vjp(h: Any, w: Any, b: Any, t: Any, ce_bar: Any, spec: Any, weight: Any) -> Any:
    out = _linear.weight_vjp(h, w, b, t, ce_bar, spec, xp=array_namespace(h), hooks=_HOOKS)
    return out.astype(weight.dtype)


_linear_scalar.defvjp(_linear_scalar_fwd, _linear_scalar_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _linear_rows(h: Any, w: Any, b: Any, t: Any, weight: Any, spec: Any) -> Any:
    return _linear.rows(h, w, b, t, weight, spec, xp=array_namespace(h), hooks=_HOOKS)


def _linear_rows_fwd(h: Any, w: Any, b: Any, t: Any, weight: Any, spec: Any) -> Any:
    ce, lse = _linear_rows(h, w, b, t, weight, spec)
    return (ce, lse), (h, w, b, t, weight)


def _linear_rows_bwd(spec: Any, res: Any, bars: Any) -> Any:
    h, w, b, t, weight = res
    ce_bar, lse_bar = bars
    xp = array_namespace(h)
    dh, dw, db = _linear.rows_vjp(h, w, b, t, weight, ce_bar, lse_bar, spec, xp=xp, hooks=_HOOKS)
    weight_bar = None if weight is None else _weight_vjp(h, w, b, t, ce_bar, spec, weight)
    return dh, dw, db, None, weight_bar


_linear_rows.defvjp(_linear_rows_fwd, _linear_rows_bwd)


def _spec(call: _linear.LinearCall) -> _linear.Spec:
    return _linear.Spec(call.opts, plan(call.w.T, may_ignore=call.may_ignore, shard=call.shard), call.chunk)


def _unchunked_rows(call: _linear.LinearCall) -> tuple[Any, Any]:
    """With traced options: the logits at once (their full memory), through :func:`row_losses`, which JAX
    differentiates (options included)."""
    z = _linear.unchunked_logits(call.h, call.w, call.b, call.xp)
    return row_losses(z, call.target, call.weight, call.opts, call.may_ignore, call.xp, call.shard)


def linear_rows(call: _linear.LinearCall) -> tuple[Any, Any]:
    if call.opts.arrays:
        return _unchunked_rows(call)
    return _linear_rows(call.h, call.w, call.b, call.target, call.weight, _spec(call))


def linear_scalar(call: _linear.LinearCall, ce_scale: Any, lse_scale: Any) -> Any:
    if call.opts.arrays:
        return _linear.scalar_loss(*_unchunked_rows(call), ce_scale, lse_scale, call.xp)
    return _linear_scalar(call.h, call.w, call.b, call.target, call.weight, ce_scale, lse_scale, _spec(call))


def linear_out_dtype(dtype: Any, hidden: Any) -> Any:
    """The loss's dtype: the inputs'."""
    return dtype
