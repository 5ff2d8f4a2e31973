"""Argument validation: every error message of the public functions lives here.

Each message names the argument, what was expected and what came. Checks on
*values* (class indices in range) run only when the values are concrete; under
tracing (``jax.jit``, ``torch.compile``) the math poisons the result with NaN.
"""

from __future__ import annotations

import math
from typing import Any

import numpy

from . import _compat
from ._math import Options

Array = Any
Namespace = Any

REDUCTIONS = ("none", "sum", "mean")


def array(a: Any, name: str) -> None:
    """TypeError unless ``a`` is a plain (dense, unmasked) array of an array library."""
    if isinstance(a, numpy.ma.MaskedArray):
        raise TypeError(f"multixent: {name}: numpy.ma.MaskedArray not supported; pass .filled(...) or a plain array")
    if isinstance(a, numpy.matrix):
        raise TypeError(f"multixent: {name} is a numpy.matrix, not supported; pass numpy.asarray({name})")
    if "sparse" in str(getattr(a, "layout", "")):
        raise TypeError(
            f"multixent: {name} is a sparse tensor ({a.layout}), not supported; pass a dense one (.to_dense())"
        )
    if not _compat.is_array_api_obj(a):
        raise TypeError(
            f"multixent: {name} must be an array (NumPy, torch, JAX or any array-API library); got {type(a).__name__}"
        )


def namespace(*arrays: Array | None, names: tuple[str, ...] = ()) -> Namespace:
    """The one array namespace of all arrays given (None skipped where optional).

    ``names`` name the arguments in order; those named are checked with :func:`array`
    (None allowed only for ``weight`` and ``bias``).
    """
    for a, name in zip(arrays, names, strict=False):
        if a is not None or name not in ("weight", "bias"):
            array(a, name)
    given = [a for a in arrays if a is not None]
    try:
        return _compat.array_namespace(*given)
    except TypeError as err:
        kinds = ", ".join(sorted({type(a).__module__ + "." + type(a).__qualname__ for a in given}))
        raise TypeError(
            f"multixent: all arrays of one call must come from one array library; got {kinds} ({err})"
        ) from None


_FLOATS = "float16, bfloat16, float32 or float64"


#: Per ``(namespace, dtype)``: "floating", "integral" or "" (anything else).
_KINDS: dict[tuple[Any, Any], str] = {}


def _kind(dtype: Any, xp: Namespace) -> str:
    """The dtype's kind, computed once per namespace and dtype."""

    def compute() -> str:
        try:
            floating = bool(xp.isdtype(dtype, "real floating"))
        except TypeError:  # NumPy's isdtype refuses the ml_dtypes types (bfloat16, float8_*)
            floating = bool(numpy.dtype(dtype).name == "bfloat16")
        return "floating" if floating else "integral" if xp.isdtype(dtype, "integral") else ""

    return _compat.memo(_KINDS, (xp, dtype), compute)


def is_floating(dtype: Any, xp: Namespace) -> bool:
    """``xp.isdtype(dtype, "real floating")``, true also for NumPy's ml_dtypes bfloat16."""
    return _kind(dtype, xp) == "floating"


#: Per ``(namespace, dtype)``: the error message of :func:`floating` ("" when the dtype is fine).
_FLOATING: dict[tuple[Any, Any], str] = {}


def floating(x: Array, name: str, xp: Namespace) -> None:
    """TypeError unless ``x`` holds float16, bfloat16, float32 or float64 (the verdict is kept per dtype)."""

    def compute() -> str:
        if not is_floating(x.dtype, xp):
            return "must have a real floating dtype ({floats}); got {dtype}"
        if xp.finfo(x.dtype).bits < 16:
            return "must have dtype {floats}; got {dtype} (cast it first)"
        return ""

    problem = _compat.memo(_FLOATING, (xp, x.dtype), compute)
    if problem:
        raise TypeError(f"multixent: {name} " + problem.format(floats=_FLOATS, dtype=x.dtype))


def class_axis(axis: Any, ndim: int, name: str = "logits") -> int:
    """``axis`` normalised into [0, ndim)."""
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise TypeError(f"multixent: axis must be an int; got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"multixent: axis={axis} is out of range for {name} of {ndim} dimensions")
    return axis % ndim


def num_classes(shape: tuple[int, ...], axis: int) -> int:
    c = shape[axis]
    if c == 0:
        raise ValueError(f"multixent: logits have zero classes along axis {axis} (shape {tuple(shape)})")
    return int(c)


def reduction(value: Any) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"multixent: reduction must be one of {REDUCTIONS}; got {value!r}")
    return str(value)


def number(value: Any, name: str, *, low: float, high: float = math.inf, open_low: bool = False) -> float:
    """A Python real in [low, high] (or (low, high] with ``open_low``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"multixent: {name} must be a Python float; got {type(value).__name__}")
    ok = (value > low if open_low else value >= low) and value <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise ValueError(f"multixent: {name} must lie in {bracket}{low}, {high}]; got {value!r}")
    return float(value)


def index_target(target: Array, xp: Namespace, function: str | None = None) -> bool:
    """True for class indices (integer dtype), False for probabilities (real floating).

    ``function`` names a function that takes class indices only (``nll_loss``).
    """
    kind = _kind(target.dtype, xp)
    integral = kind == "integral"
    if function is not None and not integral:
        raise TypeError(
            f"multixent: {function} needs class indices (an integer target, the logits' shape without the "
            f"class axis); got target of dtype {target.dtype}"
        )
    if integral:
        return True
    if kind == "floating":
        return False
    raise TypeError(
        f"multixent: target must hold class indices (an integer dtype) or class "
        f"probabilities (a real floating dtype); got {target.dtype}"
    )


def target_shape(target: Array, logits: Array, axis: int, is_index: bool) -> None:
    expected = tuple(logits.shape)
    kind = "class probabilities: the logits' shape"
    if is_index:
        expected = expected[:axis] + expected[axis + 1 :]
        kind = "class indices: the logits' shape without the class axis"
    if tuple(target.shape) != expected:
        raise ValueError(
            f"multixent: target of shape {tuple(target.shape)} does not fit logits of shape "
            f"{tuple(logits.shape)} with class axis {axis}; expected {expected} ({kind})"
        )


def ignore_index(value: Any, is_index: bool, default: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"multixent: ignore_index must be an int; got {type(value).__name__}")
    if not is_index and value != default:
        raise ValueError(
            f"multixent: ignore_index={value} applies to class-index targets only; the target holds class probabilities"
        )
    return value


def weight(w: Array | None, classes: int, xp: Namespace) -> None:
    if w is None:
        return
    if not _kind(w.dtype, xp):
        raise TypeError(f"multixent: weight must have a real dtype; got {w.dtype}")
    if tuple(w.shape) != (classes,):
        raise ValueError(f"multixent: weight must have shape ({classes},) (one per class); got {tuple(w.shape)}")


def readable(a: Array) -> bool:
    """False for arrays without values (torch ``meta`` tensors): their indices are not checked."""
    return not getattr(a, "is_meta", False)


def class_indices(target: Array, classes: int, ignore: int, wrapped_bits: int = 0, comparable: bool = True) -> bool:
    """Whether concrete class indices hold ``ignore``; IndexError naming the first outside [0, C) that is not.

    One host read of ``(min, max)`` (and of ``any(== ignore)`` when ``ignore`` is a class)
    decides the usual case, indices in range; values outside ``[0, C)`` (ignored positions
    or an error) take a second pass.
    ``comparable=False``: ``ignore`` lies outside the index dtype and matches nothing.
    ``wrapped_bits``: the target was unsigned of that many bits, cast to the signed type of
    that width, so a negative value ``v`` is really ``v + 2**bits`` (out of range, never
    ignored); the message names the true value.
    """
    xp = _compat.array_namespace(target)
    flat = target if target.ndim == 1 else xp.reshape(target, (-1,))
    if flat.shape[0] == 0:
        return False
    ignore_is_class = comparable and 0 <= ignore < classes
    stats = _compat.min_max(flat, xp)
    if ignore_is_class:
        stats.append(xp.astype(xp.any(flat == ignore), flat.dtype))
    low, high, *holds_ignore = _compat.host_ints(stats)
    if low >= 0 and high < classes:  # the usual case: in range
        return bool(holds_ignore and holds_ignore[0])
    outside = (flat < 0) | (flat >= classes)
    bad = outside & (flat != ignore) if comparable else outside
    if wrapped_bits:
        bad = bad | (flat < 0)
    if bool(xp.any(bad)):
        first = int(xp.argmax(xp.astype(bad, xp.int8)))
        value = int(flat[first])
        value += 2**wrapped_bits if wrapped_bits and value < 0 else 0
        raise IndexError(
            f"multixent: target holds class index {value} (at flat position {first}); "
            f"expected 0 <= index < {classes} (the number of classes) or ignore_index={ignore}"
        )
    return True


def linear_shapes(hidden: Array, classifier: Array, bias: Array | None, target: Array) -> tuple[int, int]:
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


def chunk_size(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"multixent: chunk_size must be a positive int or None; got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"multixent: chunk_size must be a positive int or None; got {value}")
    return value


def options(ignore_index: int, label_smoothing: Any, z_loss: Any, softcap: Any) -> tuple[Options, float]:
    """The validated user options (hashable, built once per call) and the z-loss coefficient."""
    smoothing = number(label_smoothing, "label_smoothing", low=0.0, high=1.0)
    z = number(z_loss, "z_loss", low=0.0)
    cap = None if softcap is None else number(softcap, "softcap", low=0.0, open_low=True)
    cap = None if cap == math.inf else cap  # softcap=inf: s·tanh(x/s) -> x, no cap
    return Options(ignore_index, smoothing, cap), z
