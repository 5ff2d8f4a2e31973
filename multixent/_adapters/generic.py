"""Adapter for array libraries without autodiff (NumPy, array-api-strict, ...)."""

from __future__ import annotations

import copy
import functools
import importlib
from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy

from .. import _compat, _formulas, _linear, _rows


def quiet() -> Any:
    """No floating-point warnings: NumPy's come from values the math masks
    (ignored rows holding inf/NaN, 0·log 0); results are as documented."""
    return numpy.errstate(all="ignore")


def as_array(a: Any) -> Any:
    """NumPy's scalars (what its reductions return) as 0-d arrays; anything else as it is."""
    return numpy.asarray(a) if isinstance(a, numpy.generic) else a


def quiet_graph(outs: tuple[Any, ...], inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """``outs`` (a call's results); dask arrays whose tasks beyond ``inputs``' (the call's arrays) run
    under :func:`quiet` wherever dask computes them (a worker imports multixent to run them).

    NumPy's ``errstate`` covers the call, not the later ``.compute()``: each task's function is
    wrapped in :class:`_Quiet`; the graph's layers stay as they are (dask still fuses them).
    """
    if isinstance(outs[0], numpy.ndarray) or not any(map(_is_dask, outs)):
        return outs
    HighLevelGraph = _dask("highlevelgraph").HighLevelGraph
    given = set().union(*(getattr(a.__dask_graph__(), "layers", ()) for a in inputs if _is_dask(a)))
    done: dict[str, Any] = {}  # the layers made quiet, shared by the results
    results = []
    for out in outs:
        graph = out.__dask_graph__()
        if not _is_dask(out) or not isinstance(graph, HighLevelGraph):
            results.append(out)
            continue
        keys = functools.cache(lambda graph=graph: set(graph.keys()))  # the graph's, read once if needed
        for name, layer in graph.layers.items():
            if name not in given and name not in done:
                done[name] = _quiet_layer(layer, keys)
        layers = {name: done.get(name, layer) for name, layer in graph.layers.items()}
        quiet_graph = HighLevelGraph(layers, graph.dependencies)
        results.append(_dask("array").Array(quiet_graph, out.name, out.chunks, meta=out._meta))
    return tuple(results)


def _is_dask(a: Any) -> bool:
    return bool(array_api_compat.is_dask_array(a))


def _dask(module: str) -> Any:
    """A dask module (``dask.<module>``), imported when dask arrays arrive (``dask.array`` is then imported)."""
    return importlib.import_module(f"dask.{module}")


def _quiet_layer(layer: Any, keys: Callable[[], set[Any]]) -> Any:
    """A copy of a dask graph layer whose tasks' functions are :class:`_Quiet` (a ``Blockwise`` layer
    stays one: its task template is wrapped)."""
    Task = _dask("task_spec").Task
    if type(layer) is _dask("blockwise").Blockwise:
        new = copy.copy(layer)
        new.__dict__.pop("_cached_dict", None)  # its tasks, once built: rebuilt from the new template
        new.task = _quiet_node(layer.task)
        return new
    tasks = {}
    for key, task in layer.items():  # a task of the old tuple form names the graph's keys it reads
        node = _dask("_task_spec").convert_legacy_task(key, task, keys())
        tasks[key] = _quiet_node(node) if type(node) is Task else task
    return _dask("highlevelgraph").MaterializedLayer(tasks)


def _quiet_node(node: Any) -> Any:
    """A task (and the tasks nested in its arguments) with :class:`_Quiet` functions; anything else as it is."""
    Task = _dask("task_spec").Task
    if type(node) is not Task or isinstance(node.func, _Quiet):  # data, references, containers, done
        return node
    args = tuple(map(_quiet_node, node.args))
    kwargs = {k: _quiet_node(v) for k, v in node.kwargs.items()}
    return Task(node.key, _Quiet(node.func), *args, **kwargs)


class _Quiet:
    """A dask task's function, run under :func:`quiet`."""

    __slots__ = ("func",)

    def __init__(self, func: Any) -> None:
        self.func = func

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with quiet():
            return self.func(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Quiet, (self.func,))

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        return ("multixent._Quiet", self.func)

    def __repr__(self) -> str:
        return f"quiet({self.func!r})"


#: Arrays of one library only (NumPy's are NumPy's; array-api-strict and dask take no others).
NUMPY_INPUTS: bool | str = False


def concrete(a: Any, in_group: bool = False) -> Any:
    """None for lazy arrays, and for CuPy's unless ``MULTIXENT_SYNC_CHECKS=1`` (no host read on a GPU:
    out-of-range indices give NaN there, as under tracing). No process groups here: ``in_group`` is unused."""
    if isinstance(a, numpy.ndarray):
        return a
    if array_api_compat.is_lazy_array(a) or (array_api_compat.is_cupy_array(a) and not _compat.SYNC_CHECKS):
        return None
    return a


def scalar(a: Any) -> float | None:
    return None if array_api_compat.is_lazy_array(a) else float(a)


def plan(x: Any, *inputs: Any, may_ignore: bool, differentiable: bool = False, shard: Any = None) -> _rows.Plan:
    """Blocks of rows (one for lazy arrays, which dask chunks itself); in place for NumPy
    (``out=`` and integer-array setitem). No autodiff here: ``differentiable`` changes nothing."""
    if isinstance(x, numpy.ndarray):
        return _rows.eager_plan(x.shape[-1], True, may_ignore)
    one_block = array_api_compat.is_lazy_array(x) or array_api_compat.is_cupy_array(x)  # dask chunks; a GPU
    return _rows.eager_plan(None if one_block else x.shape[-1], False, may_ignore)


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
    """No groups here (``shard`` is None: a group's arrays are its framework's, checked before)."""
    opts = opts.astype(_formulas.compute_dtype(x.dtype, xp), xp) if opts.arrays else opts
    return _rows.row_losses(x, target, weight, opts, plan(x, may_ignore=may_ignore), xp=xp, need_lse=need_lse)


def fused(x: Any, target: Any, weight: Any, loss: Any) -> Any:
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
