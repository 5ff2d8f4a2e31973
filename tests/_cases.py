"""Shared test data: layouts, option sets, random inputs, and dtype-scaled comparisons."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: name -> (logits shape, class axis)
LAYOUTS: dict[str, tuple[tuple[int, ...], int]] = {
    "2d": ((7, 5), -1),
    "2d-axis0": ((5, 7), 0),
    "kdim-axis1": ((3, 5, 4), 1),
    "kdim-axis1-d1eqC": ((3, 5, 5), 1),
    "kdim-last-d1eqC": ((3, 5, 5), -1),
    "4d-axis1": ((2, 4, 3, 2), 1),
    "unbatched": ((5,), -1),
    "unbatched-axis0": ((5,), 0),
}

#: option sets; "weight"/"ignore" are flags turned into arrays by :func:`make_case`
OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "weight": {"weight": True},
    "ignore": {"ignore": True},
    "ignore-class1": {"ignore": True, "ignore_index": 1},  # an ignore_index that is also a class
    "smoothing": {"label_smoothing": 0.25},
    "smoothing1": {"label_smoothing": 1.0},
    "z_loss": {"z_loss": 0.1},
    "softcap": {"softcap": 2.0},
    "weight-ignore-smoothing": {"weight": True, "ignore": True, "label_smoothing": 0.2},
    "all": {"weight": True, "ignore": True, "label_smoothing": 0.1, "z_loss": 0.05, "softcap": 3.0},
}

REDUCTIONS = ("none", "sum", "mean")
KINDS = ("index", "probs")


def applies(option: str, kind: str) -> bool:
    """ignore_index applies to class-index targets only."""
    return kind == "index" or not OPTIONS[option].get("ignore")


@dataclass
class Case:
    """NumPy (float64 / int64) inputs and the keyword options, weight as a NumPy array."""

    x: np.ndarray
    target: np.ndarray
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def none_counted(self) -> bool:
        """Class indices, all equal to ignore_index: torch's "mean" is NaN there (ours 0)."""
        ignore = self.options.get("ignore_index", -100)
        return bool(np.issubdtype(self.target.dtype, np.integer) and np.all(self.target == ignore))

    @property
    def weight(self) -> np.ndarray | None:
        return self.options.get("weight")

    def on(self, backend: Any, dtype: str = "float64") -> tuple[Any, Any, dict[str, Any]]:
        """The inputs in ``backend``'s library: logits (and weight, probabilities) in ``dtype``."""
        x = backend.asarray(self.x, dtype)
        is_index = np.issubdtype(self.target.dtype, np.integer)
        t = backend.asarray(self.target, None if is_index else dtype)
        kw = dict(self.options)
        if kw.get("weight") is not None:
            kw["weight"] = backend.asarray(kw["weight"], dtype)
        return x, t, kw

    def quantized(self, backend: Any, dtype: str) -> Case:
        """The same case with the floating inputs rounded to ``dtype`` (as the backend holds them)."""
        x, t, kw = self.on(backend, dtype)
        options = dict(self.options)
        if options.get("weight") is not None:
            options["weight"] = backend.to_numpy(kw["weight"]).astype(np.float64)
        target = self.target
        if not np.issubdtype(target.dtype, np.integer):
            target = backend.to_numpy(t).astype(np.float64)
        return Case(backend.to_numpy(x).astype(np.float64), target, options)


def make_case(layout: str, kind: str = "index", option: str = "plain", seed: int = 0, scale: float = 2.0) -> Case:
    shape, axis = LAYOUTS[layout]
    spec = OPTIONS[option]
    rng = np.random.default_rng(seed)
    classes = shape[axis]
    batch = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
    x = rng.normal(size=shape) * scale
    options: dict[str, Any] = {k: v for k, v in spec.items() if k not in ("weight", "ignore")}
    options["axis"] = axis
    if kind == "index":
        target = rng.integers(0, classes, size=batch).astype(np.int64)
        if spec.get("ignore"):
            ignore = spec.get("ignore_index", -100)
            flat = target.reshape(-1)
            if ignore == -100:  # every third position ignored (at least one)
                flat[::3] = ignore
            # with ignore_index=1 the positions holding class 1 are ignored: make sure some do
            else:
                flat[1::3] = ignore
            target = flat.reshape(batch)
    else:
        p = rng.dirichlet(np.ones(classes), size=batch or None)
        p = np.ascontiguousarray(np.reshape(p, (*batch, classes)))
        # an exact zero: probability targets need not be strictly positive
        row = p.reshape(-1, classes)[0]
        row[0] = 0.0
        row /= row.sum()
        target = np.moveaxis(p, -1, axis)
    if spec.get("weight"):
        options["weight"] = rng.uniform(0.2, 2.0, size=classes)
    return Case(x, np.array(target, order="C"), options)


# --------------------------------------------------------------------------
# Comparisons

#: tolerance in units of finfo(dtype).eps: float32/float64 results are sums of
#: a few dozen rounded terms; float16/bfloat16 results are computed in float32
#: and rounded once to the output dtype (half an eps relative).
_FACTOR = {"float64": 64.0, "float32": 64.0, "float16": 2.0, "bfloat16": 2.0}


def tolerance(backend: Any, dtype: str, factor: float | None = None) -> float:
    return (_FACTOR[dtype] if factor is None else factor) * backend.eps(dtype)


def assert_close(
    backend: Any,
    got: Any,
    want: Any,
    dtype: str = "float64",
    *,
    factor: float | None = None,
    scale: float | None = None,
) -> None:
    """``got`` (an array of ``backend``, or NumPy) within a dtype-scaled tolerance of ``want`` (NumPy).

    Relative tolerance ``factor·eps`` and absolute ``factor·eps·scale`` with
    ``scale`` the largest finite ``|want|`` unless given (so near-zero entries
    of an array are judged on the array's scale). NaN and ±inf must sit at
    the same places.
    """
    if isinstance(got, (np.ndarray, np.generic, float)):
        got_np = np.asarray(got, dtype=np.float64)
    else:
        got_np = backend.to_numpy(got).astype(np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got_np.shape == want.shape, f"shape {got_np.shape} != expected {want.shape}"
    tol = tolerance(backend, dtype, factor)
    if scale is None:
        finite = want[np.isfinite(want)]
        scale = float(np.max(np.abs(finite))) if finite.size else 1.0
    np.testing.assert_allclose(got_np, want, rtol=tol, atol=tol * max(scale, 1e-300), equal_nan=True)


def assert_result(
    backend: Any, got: Any, want: Any, dtype: str, *, factor: float | None = None, scale: float | None = None
) -> None:
    """As :func:`assert_close`, and ``got`` is an array of ``backend``'s library in ``dtype``."""
    assert backend.is_array(got), f"result is a {type(got)}, not an array of {backend.name}"
    assert backend.dtype_name(got) == dtype, f"result dtype {got.dtype}, expected {dtype}"
    assert_close(backend, got, want, dtype, factor=factor, scale=scale)


def sharded_options(ignore_class: int) -> dict[str, dict[str, Any]]:
    """The option specs of the sharded tests (shard_map, torch groups), keyed by name.

    "weight": the full ``(C,)`` class weights; "probs": probability targets;
    ``ignore_class``: a class used as ``ignore_index`` (chosen to fall on a shard's edge).
    """
    return {
        "plain": {},
        "weight": {"weight": True},
        "label-smoothing": {"label_smoothing": 0.1},
        "smoothing-weight": {"label_smoothing": 0.3, "weight": True},
        "z-loss": {"z_loss": 1e-2},
        "softcap": {"softcap": 3.0},
        f"ignore-index-{ignore_class}": {"ignore_index": ignore_class, "weight": True},
        "probs": {"probs": True},
        "probs-smoothing-weight": {"probs": True, "label_smoothing": 0.2, "weight": True},
        "every-option-sum": {
            "weight": True,
            "label_smoothing": 0.1,
            "z_loss": 1e-3,
            "softcap": 3.0,
            "reduction": "sum",
        },
        "none": {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3, "reduction": "none"},
    }
