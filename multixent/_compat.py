"""array-api-compat's lookups, with torch tensors recognised directly.

array-api-compat caches its type checks with ``functools.lru_cache``, and
``torch.compile`` warns of every such call it traces (19 warnings on a
process's first compile of ``cross_entropy``). Torch tensors are recognised
here with a plain ``isinstance`` (against torch once it is imported; nothing
imports it); any other array goes to array-api-compat, whose answer is kept
per tuple of array types (it depends on the types only), so a call pays a
dictionary lookup, not compat's checks.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import array_api_compat
import array_api_extra as xpx
import numpy

T = TypeVar("T")


#: Private switch: run the accelerator strategy (one block, no host read, the index check on the device) on
#: CPU tensors too, so that the CPU proves its values and counts its passes. ``MULTIXENT_ACCELERATOR_ON_CPU=1``
#: before import, or set this attribute.
ACCELERATOR_ON_CPU = os.environ.get("MULTIXENT_ACCELERATOR_ON_CPU", "") == "1"
#: ``MULTIXENT_SYNC_CHECKS=1`` (before import, or set this attribute): on accelerators too, read the class
#: indices to the host and raise an ``IndexError`` for one out of range, as on the CPU (a host
#: synchronisation per call: for debugging). Otherwise accelerators check them on the device.
SYNC_CHECKS = os.environ.get("MULTIXENT_SYNC_CHECKS", "") == "1"
#: Private switch, off until a GPU shows it faster: the accelerator strategy's loss-and-gradient passes (torch's
#: training step: ``cross_entropy``'s, and each chunk's of ``linear_cross_entropy``) compiled with
#: ``torch.compile(dynamic=True)``, which costs a compile on the first call of each kind.
#: ``MULTIXENT_COMPILED_STRATEGY=1`` before import, or set this attribute.
COMPILED_STRATEGY = os.environ.get("MULTIXENT_COMPILED_STRATEGY", "") == "1"


def is_torch_array(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def is_array_api_obj(x: Any) -> bool:
    return is_torch_array(x) or array_api_compat.is_array_api_obj(x)


def compiling() -> bool:
    """Whether ``torch.compile`` is tracing (False when torch is not imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and bool(torch.compiler.is_compiling())


class Memo(Generic[T]):
    """Answers kept per key (types, dtypes, namespaces, Python options: a handful per process; the first
    256 are kept): ``memo(key, compute)``, or :meth:`get` and :meth:`put`.

    While ``torch.compile`` traces, nothing is kept or looked up: the table is never handed to dynamo,
    which before torch 2.13 cannot hash a module or a NumPy dtype among its keys and stops the trace."""

    def __init__(self) -> None:
        self._found: dict[Any, T] = {}

    def get(self, key: Any) -> T | None:
        return None if compiling() else self._found.get(key)

    def put(self, key: Any, value: T) -> None:
        if not compiling() and len(self._found) < 256:
            self._found[key] = value

    def __call__(self, key: Any, compute: Callable[[], T]) -> T:
        if compiling():
            return compute()
        found = self._found.get(key)
        if found is None:
            found = compute()
            if len(self._found) < 256:
                self._found[key] = found
        return found


#: array-api-compat's namespace per tuple of (non-torch) array types.
_NAMESPACES: Memo[Any] = Memo()


def array_namespace(*xs: Any) -> Any:
    if xs and all(is_torch_array(x) for x in xs):
        import array_api_compat.torch as xp  # array_api_compat.array_namespace's answer

        return xp
    return _NAMESPACES(tuple(type(x) for x in xs), lambda: array_api_compat.array_namespace(*xs))


def device(x: Any) -> Any:
    if isinstance(x, numpy.ndarray):
        return "cpu"  # array_api_compat.device's answer
    return x.device if is_torch_array(x) else array_api_compat.device(x)


def take_rows(x: Any, index: Any, xp: Any) -> Any:
    """``x[i, index[i]]`` for each row ``i`` of 2-D ``x`` (``xp.take_along_axis`` along the last axis), for
    indices already in range: torch's ``gather`` by methods (compat's wrapper adds three operations that
    map negative indices; ``take_along_dim`` one more that wraps them), NumPy's integer-array indexing
    (its function takes 10 us of Python)."""
    if is_torch_array(x):
        return x.gather(1, index.unsqueeze(1)).squeeze(1)
    if isinstance(x, numpy.ndarray):
        return x[numpy.arange(x.shape[0]), index]
    return xp.take_along_axis(x, index[:, None], axis=-1)[:, 0]


def take(a: Any, index: Any, xp: Any) -> Any:
    """``xp.take(a, index)`` of a 1-d ``a`` at indices already in range: torch's ``index_select`` (compat's
    wrapper adds three operations that map negative indices), NumPy's integer-array indexing."""
    if is_torch_array(a):
        return a.index_select(0, index)
    if isinstance(a, numpy.ndarray):
        return a[index]
    return xp.take(a, index)


def mean(a: Any, xp: Any) -> Any:
    """``xp.mean(a)`` of a non-empty 1-d array: NumPy's as its sum (the ufunc's reduction, which
    ``a.sum()`` calls) over its length, what ``numpy.mean`` computes without its 5 us of wrappers;
    torch's method (compat's wrapper checks its arguments)."""
    if isinstance(a, numpy.ndarray):
        return numpy.add.reduce(a) / a.dtype.type(a.shape[0])
    return a.mean() if is_torch_array(a) else xp.mean(a)


def row_sum(a: Any, xp: Any) -> Any:
    """``xp.sum(a, axis=-1)``; NumPy's ufunc and torch's method skip the namespace's wrappers."""
    if isinstance(a, numpy.ndarray):
        return numpy.add.reduce(a, axis=-1)
    if is_torch_array(a):
        return a.sum(-1)
    return xp.sum(a, axis=-1)


def max_along(a: Any, axis: int, xp: Any) -> Any:
    """``xp.max(a, axis=axis, keepdims=True)``, and ``-inf`` (the empty maximum) along an empty axis: no
    class at all, or a group member holding none. NumPy's ufunc and torch's method skip the wrappers."""
    if a.shape[axis] == 0:
        shape = tuple(1 if i == axis % a.ndim else n for i, n in enumerate(a.shape))
        return xp.full(shape, -math.inf, dtype=a.dtype, device=device(a))
    if isinstance(a, numpy.ndarray):
        return numpy.maximum.reduce(a, axis=axis, keepdims=True)
    return a.amax(axis, keepdim=True) if is_torch_array(a) else xp.max(a, axis=axis, keepdims=True)


def row_max(a: Any, xp: Any) -> Any:
    """:func:`max_along` the last axis."""
    return max_along(a, -1, xp)


def min_max(a: Any, xp: Any) -> list[Any]:
    """``[min(a), max(a)]`` (0-d arrays or NumPy scalars); NumPy's methods skip its wrappers' 5 us."""
    if isinstance(a, numpy.ndarray):
        return [a.min(), a.max()]
    return [xp.min(a), xp.max(a)]


def in_range(a: Any, high: int) -> bool:
    """Whether every entry of integer ``a`` lies in ``[0, high)``, known for NumPy arrays in one reduction
    (the maximum of their unsigned view: a negative entry is larger than any index); False otherwise."""
    unsigned = _UNSIGNED.get(a.dtype) if isinstance(a, numpy.ndarray) else None
    return unsigned is not None and a.size > 0 and bool(numpy.maximum.reduce(a.view(unsigned), axis=None) < high)


#: The unsigned integer dtype of each integer dtype's width (native byte order).
_UNSIGNED = {numpy.dtype(f"{k}{n}"): numpy.dtype(f"u{n}") for k in "iu" for n in (1, 2, 4, 8)}


def host_ints(values: list[Any]) -> list[int]:
    """0-d integer arrays as Python ints: torch's in one device-to-host copy (one synchronisation)."""
    if is_torch_array(values[0]):
        return sys.modules["torch"].stack(values).tolist()  # type: ignore[no-any-return]
    return [int(v) for v in values]


def fixed_defaults(xp: Any) -> bool:
    """Whether ``xp``'s default dtypes are fixed for the process (JAX's follow ``jax_enable_x64``)."""
    return not array_api_compat.is_jax_namespace(xp)


def known_size(n: Any) -> bool:
    """Whether an array's size along an axis is known: dask's NaN (rows selected by a lazy mask) and the
    array API's None are sizes known only once computed."""
    return n is not None and n == n


def clip(x: Any, low: float, high: float, xp: Any) -> Any:
    """``xp.clip`` with Python bounds in one operation: compat's wrappers for torch and NumPy
    check and broadcast the bounds (NumPy's takes ~20 us)."""
    if is_torch_array(x):
        return x.clamp(low, high)
    if isinstance(x, numpy.ndarray):  # two ufuncs; numpy.clip's wrappers take 5 us
        return numpy.minimum(numpy.maximum(x, low), high)
    if not all(map(known_size, x.shape)):  # compat's clip broadcasts the shapes, which needs them known
        return xp.minimum(xp.maximum(x, low), high)
    return xp.clip(x, low, high)


def subtract_at_rows(g: Any, index: Any, values: Any, xp: Any) -> Any:
    """``g[i, index[i]] -= values[i]`` for every row, in place: torch's ``scatter_add_`` (two
    operations where the setitem is four), else setitem (as ``xpx.at(copy=False)`` would do
    after 30 us of Python per call)."""
    if is_torch_array(g):
        return g.scatter_add_(1, index.unsqueeze(1), values.neg().unsqueeze(1))
    if isinstance(g, numpy.ndarray):  # NumPy's own arange (compat's checks the device first: 5 us)
        rows = numpy.arange(g.shape[0])
    else:
        rows = xp.arange(g.shape[0], dtype=index.dtype, device=device(g))
    g[rows, index] -= values
    return g


def subtract_at_rows_copy(g: Any, index: Any, values: Any, xp: Any) -> Any:
    """``g`` with ``values[i]`` subtracted at ``g[i, index[i]]`` in each row, out of place: JAX's scatter
    (``xpx.at``), a pass over the rows alone; elsewhere a one-hot ``where``, which torch.compile fuses,
    torch.func batches and dask keeps lazy. (Under ``jax.jit`` that ``where`` is a compare and a select
    per element: 1.13x the time of a whole value_and_grad at 512 x 1000 on the CPU, the scatter 1.0x.)"""
    if array_api_compat.is_jax_namespace(xp):
        return xpx.at(g)[xp.arange(g.shape[0]), index].subtract(values)
    classes = xp.arange(g.shape[-1], dtype=index.dtype, device=device(g))
    return xp.where(classes == index[:, None], g - values[:, None], g)


def zero_nan(a: Any, xp: Any) -> Any:
    """``a`` with its NaN entries 0, its infinities kept: ``where(isnan(a), 0, a)``; torch's ``nan_to_num``
    (one operation where the mask and the select are two)."""
    if is_torch_array(a):
        return a.nan_to_num(nan=0.0, posinf=math.inf, neginf=-math.inf)
    return xp.where(xp.isnan(a), 0.0, a)


def count_true(mask: Any, dtype: Any, xp: Any) -> Any:
    """The number of True entries of a boolean array, 0-d of ``dtype``: torch's sum with a dtype (one operation);
    the standard's ``sum`` takes numbers only (a cast first)."""
    if is_torch_array(mask):
        return mask.sum(dtype=dtype)
    return xp.sum(xp.astype(mask, dtype))


def full_like(a: Any, value: float, xp: Any) -> Any:
    """``xp.full_like(a, value)``; NumPy's own function (compat's wrapper checks the device first)."""
    return numpy.full_like(a, value) if isinstance(a, numpy.ndarray) else xp.full_like(a, value)


def float_bits(dtype: Any, xp: Any) -> int:
    """``xp.finfo(dtype).bits``; a NumPy dtype's from its item size (NumPy 1.x's finfo refuses ml_dtypes' bfloat16)."""
    return 8 * dtype.itemsize if isinstance(dtype, numpy.dtype) else int(xp.finfo(dtype).bits)
