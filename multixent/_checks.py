"""Argument validation: every error message of the public functions lives here.

Each message names the argument, what was expected and what came. Checks on
*values* (class indices in range) run only when the values are concrete; under
tracing (``jax.jit``, ``torch.compile``) the math makes the results they touch NaN.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy

from . import _compat
from ._formulas import Options

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


def namespace(
    *arrays: Array | None, names: tuple[str, ...] = (), numpy_inputs: bool | str = False
) -> tuple[Namespace, tuple[Array | None, ...]]:
    """The one array namespace of all arrays given (None skipped where optional), and the arrays.

    ``names`` name the arguments in order; those named are checked with :func:`array`
    (None allowed only for ``weight`` and ``bias``). The first array leads: beside an
    array of another library, NumPy arrays (and Python numbers) are converted to the
    lead's library and device when ``numpy_inputs`` is True (its adapter's
    ``NUMPY_INPUTS``: the framework's own functions take them, as ``jnp`` does); when it
    is a string, that conversion (e.g. ``"torch.as_tensor"``) is named in the TypeError.
    """
    if numpy_inputs is True and _leads_numpy_inputs(arrays):
        arrays = _adopted(arrays, names)
    for a, name in zip(arrays, names, strict=False):
        if a is not None or name not in _OPTIONAL:
            array(a, name)
    given = [a for a in arrays if a is not None]
    try:
        return _compat.array_namespace(*given), arrays
    except TypeError as err:
        raise _mixed_libraries(err, arrays, names, numpy_inputs) from None


#: The arguments that may be None.
_OPTIONAL = ("weight", "bias")


def _leads_numpy_inputs(arrays: tuple[Array | None, ...]) -> bool:
    """Whether the first array is another library's, beside NumPy arrays or Python numbers to convert to it."""
    lead = arrays[0]
    return any(_convertible(a) for a in arrays[1:]) and not _convertible(lead) and _compat.is_array_api_obj(lead)


def _adopted(arrays: tuple[Array | None, ...], names: tuple[str, ...]) -> tuple[Array | None, ...]:
    """``arrays`` with the NumPy ones (and Python numbers) converted to the first array's library and device."""
    lead = arrays[0]
    xp, dev = _compat.array_namespace(lead), _compat.device(lead)
    adopted = [lead]
    for i, a in enumerate(arrays[1:], 1):
        if not _convertible(a):
            adopted.append(a)
        elif i < len(names) and names[i] == "target":  # class indices: checked by their values as given
            adopted.append(_adopted_target(a, xp, dev))
        else:
            adopted.append(xp.asarray(a, device=dev))
    return tuple(adopted)


def _mixed_libraries(
    err: TypeError, arrays: tuple[Array | None, ...], names: tuple[str, ...], numpy_inputs: bool | str
) -> TypeError:
    """The TypeError for arrays of two libraries, naming the conversion ``numpy_inputs`` (a string) where
    NumPy arrays came beside another library's lead."""
    given = [a for a in arrays if a is not None]
    kinds = ", ".join(sorted({type(a).__module__ + "." + type(a).__qualname__ for a in given}))
    hint = ""
    if isinstance(numpy_inputs, str) and not _is_numpy(arrays[0]):
        numpy_names = [n for a, n in zip(arrays, names, strict=False) if a is not None and _is_numpy(a)]
        if numpy_names:
            lead_name = names[0] if names else "the first array"
            hint = f"; convert NumPy arrays first: {numpy_inputs}({numpy_names[0]}, device={lead_name}.device)"
    return TypeError(f"multixent: all arrays of one call must come from one array library; got {kinds}{hint} ({err})")


def _adopted_target(target: Any, xp: Namespace, dev: Any) -> Any:
    """A NumPy (or Python int) ``target`` in ``xp``'s arrays; IndexError naming the first value, as given,
    that the conversion or the later cast to the index dtype would change (JAX without ``jax_enable_x64``
    makes int64 int32 and uint64 uint32; its index dtype is int32), checked on the NumPy values: under
    ``jit`` the converted array is traced."""
    values = numpy.asarray(target)
    converted = xp.asarray(values, device=dev)
    if values.dtype.kind not in "iu" or values.size == 0:
        return converted
    index = xp.__array_namespace_info__().default_dtypes(device=dev)["indexing"]
    given, to, to_index = numpy.iinfo(values.dtype), xp.iinfo(converted.dtype), xp.iinfo(index)
    low, high = max(to.min, to_index.min), min(to.max, to_index.max)
    if low <= given.min and given.max <= high:  # every value fits: the usual case, no pass over them
        return converted
    flat = values.reshape(-1)
    if low <= flat.min() and flat.max() <= high:
        return converted
    first = int(((flat < low) | (flat > high)).argmax())
    raise IndexError(
        f"multixent: target holds class index {int(flat[first])} (at flat position {first}), which "
        f"{getattr(xp, '__name__', 'the logits library')}'s index dtype {index} cannot hold; "
        "expected 0 <= index < the number of classes, or ignore_index"
    )


def _is_numpy(a: Any) -> bool:
    return isinstance(a, (numpy.ndarray, numpy.generic))


def _convertible(a: Any) -> bool:
    """A plain NumPy array or scalar, or a Python number: what ``jnp`` functions take beside JAX arrays."""
    if isinstance(a, (int, float)):
        return not isinstance(a, bool)
    return _is_numpy(a) and not isinstance(a, (numpy.ma.MaskedArray, numpy.matrix))


_FLOATS = "float16, bfloat16, float32 or float64"


#: Per ``(namespace, dtype)``: "floating", "integral" or "" (anything else).
_KINDS: _compat.Memo[str] = _compat.Memo()


def _kind(dtype: Any, xp: Namespace) -> str:
    """The dtype's kind, computed once per namespace and dtype."""

    def compute() -> str:
        try:
            floating, integral = bool(xp.isdtype(dtype, "real floating")), bool(xp.isdtype(dtype, "integral"))
        except TypeError:  # NumPy 2's isdtype refuses the ml_dtypes types (bfloat16, float8_*)
            floating = integral = False
        # and NumPy 1.x's (array-api-compat's issubdtype) answers False for them: bfloat16 by its name
        if floating or (isinstance(dtype, numpy.dtype) and dtype.name == "bfloat16"):
            return "floating"
        return "integral" if integral else ""

    return _KINDS((xp, dtype), compute)


def is_floating(dtype: Any, xp: Namespace) -> bool:
    """``xp.isdtype(dtype, "real floating")``, true also for NumPy's ml_dtypes bfloat16."""
    return _kind(dtype, xp) == "floating"


#: Per ``(namespace, dtype)``: the error message of :func:`floating` ("" when the dtype is fine).
_FLOATING: _compat.Memo[str] = _compat.Memo()


def floating(x: Array, name: str, xp: Namespace, target: Array | None = None) -> None:
    """TypeError unless ``x`` holds float16, bfloat16, float32 or float64 (the verdict is kept per dtype).

    ``target``: the call's target, to say when the two look swapped (integer logits beside a
    floating target shaped like logits with one more axis).
    """

    def compute() -> str:
        if not is_floating(x.dtype, xp):
            return "must have a real floating dtype ({floats}); got {dtype}"
        if _compat.float_bits(x.dtype, xp) < 16:
            return "must have dtype {floats}; got {dtype} (cast it first)"
        return ""

    problem = _FLOATING((xp, x.dtype), compute)
    if not problem:
        return
    hint = ""
    if (
        not is_floating(x.dtype, xp)
        and target is not None
        and is_floating(target.dtype, xp)
        and _one_more_axis(target.shape, x.shape)
    ):
        hint = f" and target (shape {tuple(target.shape)}) looks like the logits: {_SWAPPED}"
    raise TypeError(f"multixent: {name} " + problem.format(floats=_FLOATS, dtype=x.dtype) + hint)


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
    """A real number (Python or NumPy) in [low, high] (or (low, high] with ``open_low``), as a Python float."""
    if not isinstance(value, (int, float)) and _is_numpy(value) and value.ndim == 0 and value.dtype.kind in "iuf":
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"multixent: {name} must be a real number or a 0-d array of the logits' library; got {type(value).__name__}"
        )
    ok = (value > low if open_low else value >= low) and value <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise ValueError(f"multixent: {name} must lie in {bracket}{low}, {high}]; got {value!r}")
    return float(value)


#: The options' ranges: (low, high, open_low).
_RANGES = {"label_smoothing": (0.0, 1.0, False), "z_loss": (0.0, math.inf, False), "softcap": (0.0, math.inf, True)}


def option(value: Any, name: str, logits: Array, read: Any) -> float | Array:
    """A Python float, or a 0-d floating array of the logits' library kept as it is.

    ``read(a)`` (the adapter's ``scalar``) gives a 0-d array's value when it is concrete and
    not differentiated; such a value, a NumPy scalar or 0-d array and a Python number become a
    range-checked float. An array that is traced (``jax.jit``, ``torch.compile``) or
    differentiated (``requires_grad``, ``jax.grad``) stays an array: its range is checked by
    :func:`option_nan_factor` as NaN results.
    """
    low, high, open_low = _RANGES[name]
    if isinstance(value, float):  # the usual case
        return number(value, name, low=low, high=high, open_low=open_low)
    if not isinstance(value, int) and not _is_numpy(value) and _compat.is_array_api_obj(value):
        try:
            _compat.array_namespace(logits, value)
        except TypeError:
            raise TypeError(
                f"multixent: {name} must be a real number or a 0-d array of the logits' library; "
                f"got {type(value).__module__}.{type(value).__qualname__}"
            ) from None
        xp = _compat.array_namespace(value)
        if tuple(value.shape) != () or not is_floating(value.dtype, xp):
            raise TypeError(
                f"multixent: {name} as an array must be 0-d and real floating; got shape "
                f"{tuple(value.shape)} and dtype {value.dtype}"
            )
        concrete = read(value)
        if concrete is None:
            return value
        value = concrete
    return number(value, name, low=low, high=high, open_low=open_low)


def option_nan_factor(values: dict[str, Any], xp: Namespace, dtype: Any, device: Any) -> Array | None:
    """1 where every array option lies in its range (:data:`_RANGES`), else NaN (None: no array option).

    The results are multiplied by it, so an out-of-range traced option gives NaN values and gradients.
    """
    valid = None
    for name, value in values.items():
        if value is None or isinstance(value, float):
            continue
        low, high, open_low = _RANGES[name]
        ok = ((value > low) if open_low else (value >= low)) & (value <= high)
        valid = ok if valid is None else valid & ok
    if valid is None:
        return None
    one, nan = (xp.full((), v, dtype=dtype, device=device) for v in (1.0, math.nan))  # made on the device
    return xp.where(valid, one, nan)


def integer(value: Any, name: str) -> int:
    """Any concrete integer scalar (Python, NumPy, a 0-d integer array) as a Python int (``operator.index``)."""
    if not isinstance(value, bool) and not isinstance(value, numpy.bool_):
        try:
            return int(operator.index(value))
        except TypeError:
            pass
    raise TypeError(f"multixent: {name} must be an integer (a concrete integer scalar); got {type(value).__name__}")


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


_SWAPPED = (
    "the arguments may be swapped: multixent takes (logits, target), Keras calls a loss as (y_true, y_pred) "
    "(use multixent.keras.CrossEntropy there)"
)


def _one_more_axis(big: tuple[int, ...], small: tuple[int, ...]) -> bool:
    """Whether ``big`` is ``small`` with one axis inserted (a class axis)."""
    big, small = tuple(big), tuple(small)
    return len(big) == len(small) + 1 and any(big[:i] + big[i + 1 :] == small for i in range(len(big)))


def _integer_valued(x: Array) -> bool:
    """Whether concrete, small ``x`` holds only integers (labels); False when unknown."""
    try:
        values = numpy.asarray(x) if math.prod(x.shape) <= 1 << 16 else None
    except Exception:  # traced, or values on a device the host cannot read: unknown
        return False
    return values is not None and values.size > 0 and bool(numpy.all(values == numpy.round(values)))


def _fits(shape: tuple[Any, ...], expected: tuple[Any, ...]) -> bool:
    """``shape == expected``, an unknown size (dask's NaN, the array API's None) matching any size."""
    if shape == expected:
        return True
    known = _compat.known_size
    return len(shape) == len(expected) and all(
        a == b or not known(a) or not known(b) for a, b in zip(shape, expected, strict=True)
    )


def target_shape(target: Array, logits: Array, axis: int, is_index: bool) -> None:
    """ValueError naming both shapes; it says so when the arguments look swapped, or labels came as floats."""
    expected = tuple(logits.shape)
    kind = "class probabilities: the logits' shape"
    if is_index:
        expected = expected[:axis] + expected[axis + 1 :]
        kind = "class indices: the logits' shape without the class axis"
    if _fits(tuple(target.shape), expected):
        return
    hint = ""
    batch = tuple(logits.shape[:axis] + logits.shape[axis + 1 :])
    if not is_index and tuple(target.shape) in (batch, (*batch, 1)):
        hint = (
            f"; a floating target of the logits' batch shape looks like class indices stored as floats (dtype "
            f"{target.dtype}): cast it to an integer dtype (Keras casts y_true to float), squeezing a trailing "
            f"axis of 1; or {_SWAPPED}"
        )
    elif not is_index and (
        _one_more_axis(target.shape, logits.shape)
        or (target.ndim == logits.ndim and logits.shape[axis] == 1 and _one_more_axis(target.shape, batch))
    ):
        labels = " (and the logits hold only integers, like labels)" if _integer_valued(logits) else ""
        hint = f"; target looks like logits of more classes{labels}: {_SWAPPED}"
    raise ValueError(
        f"multixent: target of shape {tuple(target.shape)} does not fit logits of shape "
        f"{tuple(logits.shape)} with class axis {axis}; expected {expected} ({kind}){hint}"
    )


def ignore_index(value: Any, is_index: bool, default: int) -> int:
    value = integer(value, "ignore_index")
    if not is_index and value != default:
        raise ValueError(
            f"multixent: ignore_index={value} applies to class-index targets only; the target holds class probabilities"
        )
    return int(value)


def weight_dtype(w: Array | None, xp: Namespace) -> None:
    if w is not None and not _kind(w.dtype, xp):
        raise TypeError(f"multixent: weight must have a real dtype; got {w.dtype}")


def weight_vector(w: Array | None, xp: Namespace) -> None:
    """A real 1-d ``weight`` (or None); its length is checked against the number of classes later."""
    weight_dtype(w, xp)
    if w is not None and w.ndim != 1:
        raise ValueError(f"multixent: weight must have shape (C,) (one per class); got {tuple(w.shape)}")


def weight(w: Array | None, classes: int, xp: Namespace) -> None:
    if w is None:
        return
    weight_dtype(w, xp)
    if tuple(w.shape) != (classes,):
        raise ValueError(f"multixent: weight must have shape ({classes},) (one per class); got {tuple(w.shape)}")


#: Per the types, dtypes and layouts of a call's ``(logits, target, weight)`` and the function:
#: ``(namespace, target holds class indices)``, kept once :func:`arrays` passed for them.
_ARRAYS: _compat.Memo[tuple[Namespace, bool]] = _compat.Memo()


def _signature(a: Any) -> tuple[Any, ...]:
    return (type(a), getattr(a, "dtype", None), getattr(a, "layout", None))


def arrays(
    x: Array, target: Array, w: Array | None, name: str, indices_only: str | None, numpy_inputs: bool | str
) -> tuple[Namespace, tuple[Array, Array, Array | None], bool]:
    """:func:`namespace`, :func:`floating`, :func:`index_target` and the weight's dtype, checked once per
    kind of call (what they read is the arrays' types, dtypes and layouts): the namespace, the arrays
    (NumPy ones converted, see :func:`namespace`) and whether the target holds class indices."""
    key = (name, indices_only, _signature(x), _signature(target), None if w is None else _signature(w))
    found = _ARRAYS.get(key)
    if found is not None:
        return found[0], (x, target, w), found[1]
    xp, given = namespace(x, target, w, names=(name, "target", "weight"), numpy_inputs=numpy_inputs)
    floating(given[0], name, xp, given[1])
    is_index = index_target(given[1], xp, indices_only)
    weight_dtype(given[2], xp)
    unchanged = all(a is b for a, b in zip(given, (x, target, w), strict=True))
    if unchanged:
        _ARRAYS.put(key, (xp, is_index))
    return xp, given, is_index  # type: ignore[return-value]


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
    ignore_is_class = comparable and 0 <= ignore < classes
    if not ignore_is_class and _compat.in_range(target, classes):  # the usual case, in one reduction
        return False
    xp = _compat.array_namespace(target)
    flat = target if target.ndim == 1 else xp.reshape(target, (-1,))
    if flat.shape[0] == 0:
        return False
    stats = _compat.min_max(flat, xp)
    if ignore_is_class:
        stats.append(xp.astype(xp.any(flat == ignore), flat.dtype))
    low, high, *holds_ignore = _compat.host_ints(stats)
    if low >= 0 and high < classes:  # the usual case: in range
        return bool(holds_ignore and holds_ignore[0])
    _raise_if_out_of_range(flat, classes, ignore, wrapped_bits, comparable, xp)
    return True  # outside [0, C): only ignore_index


def _raise_if_out_of_range(
    flat: Array, classes: int, ignore: int, wrapped_bits: int, comparable: bool, xp: Namespace
) -> None:
    """IndexError naming the first of the class indices ``flat`` outside [0, C) that is not ``ignore``
    (:func:`class_indices`' arguments), with its true value."""
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


def linear_shapes(
    hidden: Array, classifier: Array, bias: Array | None, target: Array, sharded: bool = False
) -> tuple[int, int]:
    """``(V, D)``; ValueError naming the shapes that do not fit. ``sharded``: ``classifier`` is a group
    member's rows, which may be none (the group's ``V`` is checked after the agreement)."""
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
    if num_classes == 0 and not sharded:
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


def options(
    ignore_index: Any, label_smoothing: Any, z_loss: Any, softcap: Any, logits: Array, read: Any
) -> tuple[Options, float | Array]:
    """The validated user options and the z-loss coefficient (kept per Python values: built once).

    Each of label_smoothing, z_loss and softcap is a Python float, or an array (see :func:`option`).
    """
    given = (ignore_index, label_smoothing, z_loss, softcap)
    types = tuple(map(type, given))
    key = None
    if _PLAIN.issuperset(types):  # type too: False == 0 but is refused
        key = (*given, *types)
        found = _OPTIONS.get(key)
        if found is not None:
            return found
    smoothing = option(label_smoothing, "label_smoothing", logits, read)
    z = option(z_loss, "z_loss", logits, read)
    cap = None if softcap is None else option(softcap, "softcap", logits, read)
    cap = None if isinstance(cap, float) and cap == math.inf else cap  # softcap=inf: s·tanh(x/s) -> x, no cap
    result = Options(integer(ignore_index, "ignore_index"), smoothing, cap), z
    if key is not None:
        _OPTIONS.put(key, result)
    return result


_PLAIN = frozenset((int, float, type(None)))
#: :func:`options`' results per Python values (and their types).
_OPTIONS: _compat.Memo[tuple[Options, float | Array]] = _compat.Memo()


def group(value: Any, class_offset: Any) -> None:
    """TypeError unless ``group`` is None, a JAX mesh axis name (str or tuple of str) or a torch
    ``ProcessGroup``; ``class_offset`` an int (torch groups only) or None."""
    if value is None:
        if class_offset is not None:
            raise ValueError("multixent: class_offset applies with a group only (the class axis split over it)")
        return
    if not _is_axis_name(value) and not type(value).__module__.startswith("torch"):
        raise TypeError(
            "multixent: group must be a JAX mesh axis name (a str or tuple of str, inside jax.shard_map) "
            f"or a torch.distributed ProcessGroup; got {type(value).__name__}"
        )
    if class_offset is not None:
        _class_offset(class_offset)


def _is_axis_name(value: Any) -> bool:
    """A JAX mesh axis name: a str, or a non-empty tuple of str."""
    return isinstance(value, str) or (
        isinstance(value, tuple) and len(value) > 0 and all(isinstance(v, str) for v in value)
    )


def _class_offset(value: Any) -> None:
    """TypeError unless ``class_offset`` is an int, ValueError if it is negative."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"multixent: class_offset must be an int or None; got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"multixent: class_offset must be >= 0; got {value}")
