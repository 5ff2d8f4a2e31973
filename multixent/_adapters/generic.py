"""Adapter for array libraries without autodiff (NumPy, array-api-strict, ...)."""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy

from .. import _compat, _linear, _math


def quiet() -> Any:
    """No floating-point warnings: NumPy's come from values the math masks
    (ignored rows holding inf/NaN, 0·log 0); results are as documented."""
    return numpy.errstate(all="ignore")


def as_array(a: Any) -> Any:
    """NumPy's scalars (what its reductions return) as 0-d arrays; anything else as it is."""
    return numpy.asarray(a) if isinstance(a, numpy.generic) else a


def quiet_graph(outs: tuple[Any, ...], inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """``outs`` (a call's results); dask arrays with their graph's tasks run under :func:`quiet`.

    NumPy's ``errstate`` covers the call, not the later ``.compute()``. The results' graph is
    optimized (fused) together first, as ``compute`` does; then each task not in ``inputs``'
    graphs (the call's arrays) enters ``quiet`` itself, wherever dask runs it (a worker
    imports multixent to run them).
    """
    if isinstance(outs[0], numpy.ndarray) or not any(map(array_api_compat.is_dask_array, outs)):
        return outs
    import dask
    import dask.array

    optimized = dask.optimize(*outs)
    graph = optimized[0].__dask_graph__()
    given = set().union(*(a.__dask_graph__().keys() for a in inputs if array_api_compat.is_dask_array(a)))
    keys = set(graph.keys())
    tasks = {k: t if k in given else _quiet_task(k, t, keys) for k, t in graph.items()}
    return tuple(dask.array.Array(tasks, o.name, o.chunks, meta=o._meta) for o in optimized)


def _quiet_task(key: Any, task: Any, keys: set[Any]) -> Any:
    """``task`` run by :func:`_run_quiet` (a task of the old tuple form converted first); data as it is."""
    from dask._task_spec import convert_legacy_task
    from dask.task_spec import DataNode, Task, TaskRef

    node = convert_legacy_task(key, task, keys)
    if not isinstance(node, Task) or node.func is _run_quiet:
        return task
    needs = tuple(node.dependencies)
    return Task(key, _run_quiet, DataNode(None, node), needs, *map(TaskRef, needs))


def _run_quiet(node: Any, keys: tuple[Any, ...], *values: Any) -> Any:
    with quiet():
        return node(dict(zip(keys, values, strict=True)))


#: Arrays of one library only (NumPy's are NumPy's; array-api-strict and dask take no others).
NUMPY_INPUTS: bool | str = False


def concrete(a: Any) -> Any:
    """None for lazy arrays, and for CuPy's unless ``MULTIXENT_SYNC_CHECKS=1`` (no host read on a GPU:
    out-of-range indices give NaN there, as under tracing)."""
    if array_api_compat.is_lazy_array(a) or (array_api_compat.is_cupy_array(a) and not _compat.SYNC_CHECKS):
        return None
    return a


def check_on_device(target: Any, classes: int, ignore: int) -> None:
    """Nothing: no device-side assertion here (NaN marks an out-of-range index where it is not read)."""


def scalar(a: Any) -> float | None:
    return None if array_api_compat.is_lazy_array(a) else float(a)


def plan(x: Any, *inputs: Any, may_ignore: bool, differentiable: bool = False, shard: Any = None) -> _math.Plan:
    """Blocks of rows (one for lazy arrays, which dask chunks itself); in place for NumPy
    (``out=`` and integer-array setitem). No autodiff here: ``differentiable`` changes nothing."""
    if isinstance(x, numpy.ndarray):
        return _math.eager_plan(x.shape[-1], True, may_ignore)
    one_block = array_api_compat.is_lazy_array(x) or array_api_compat.is_cupy_array(x)  # dask chunks; a GPU
    return _math.eager_plan(None if one_block else x.shape[-1], False, may_ignore)


def row_losses(
    x: Any,
    target: Any,
    weight: Any,
    opts: _math.Options,
    may_ignore: bool,
    xp: Any,
    shard: Any = None,
    need_lse: bool = True,
) -> tuple[Any, Any]:
    """No groups here (``shard`` is None: a group's arrays are its framework's, checked before)."""
    opts = opts.astype(_math.compute_dtype(x.dtype, xp), xp) if opts.arrays else opts
    return _math.row_losses(x, target, weight, opts, plan(x, may_ignore=may_ignore), xp=xp, need_lse=need_lse)


def fused(x: Any, target: Any, weight: Any, compute: Any, recompute: Any) -> Any:
    """None: no autodiff here."""
    return None


# --------------------------------------------------------------------------
# linear_cross_entropy: values only (no autodiff here)


def linear_rows(call: _linear.LinearCall) -> tuple[Any, Any]:
    spec = _linear.Spec(call.opts, plan(call.w.T, may_ignore=call.may_ignore), call.chunk)  # blocks of (rows, V)
    return _linear.rows(call.h, call.w, call.b, call.target, call.weight, spec, xp=call.xp)


def linear_scalar(call: _linear.LinearCall, ce_scale: Any, lse_scale: Any) -> Any:
    ce, lse = linear_rows(call)
    return _linear.scalar_loss(ce, lse, ce_scale, lse_scale, call.xp)


def linear_out_dtype(dtype: Any, hidden: Any) -> Any:
    """The loss's dtype: the inputs'."""
    return dtype
