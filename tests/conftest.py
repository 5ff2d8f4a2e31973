"""The backend fixture: one test body, run once per selected array library.

The backend set comes from the environment variable ``MULTIXENT_BACKENDS``
(comma-separated: ``numpy``, ``torch``, ``jax``, ``array-api-strict``); unset
or empty selects every one that is importable. Each backend gets its own test
id (``test_x[torch-...]``). torch and jax are imported only when selected, so
``MULTIXENT_BACKENDS=numpy`` runs without them installed.

A :class:`Backend` offers ``name``, ``xp`` (the array-API namespace),
``asarray(np_array, dtype_name)``, ``to_numpy(a)``, ``dtypes`` (the floating
dtypes it supports), ``eps(dtype_name)``, ``native`` (the framework's own loss
from :mod:`_native`, or None), ``autodiff`` (value and gradient through
the framework's autodiff, or None) and ``jit`` (``jax.jit`` on JAX, else the
function itself).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

ALL_BACKENDS = ("numpy", "array-api-strict", "torch", "jax")
_MODULES = {"numpy": "numpy", "array-api-strict": "array_api_strict", "torch": "torch", "jax": "jax"}
#: the frameworks whose tests need an extra package besides the array library
_EXTRA = {"jax": ("optax",)}


def _importable(name: str) -> bool:
    return importlib.util.find_spec(_MODULES[name]) is not None


def _selected() -> tuple[str, ...]:
    raw = os.environ.get("MULTIXENT_BACKENDS", "").strip()
    if not raw:
        return tuple(b for b in ALL_BACKENDS if _importable(b))
    names = tuple(dict.fromkeys(b.strip() for b in raw.split(",") if b.strip()))
    unknown = [b for b in names if b not in ALL_BACKENDS]
    if unknown:
        raise pytest.UsageError(f"MULTIXENT_BACKENDS: unknown backend(s) {unknown}; known: {ALL_BACKENDS}")
    return names


SELECTED = _selected()

if "jax" in SELECTED and _importable("jax"):
    # float64 JAX arrays for the float64 comparisons; set before any JAX array exists.
    import jax

    jax.config.update("jax_enable_x64", True)

if os.environ.get("MULTIXENT_COMPILED_STRATEGY") == "1" and "torch" in SELECTED and _importable("torch"):
    # The accelerator strategy's pass compiled: every kind of call a test makes compiles; at dynamo's
    # recompile limit (8 kinds) a new kind would run the eager pass, and the suite would test that instead.
    import torch._dynamo

    torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 1_000_000


# --------------------------------------------------------------------------
# Backends

_EPS = {
    "float16": float(np.finfo(np.float16).eps),
    "bfloat16": 2.0**-7,
    "float32": float(np.finfo(np.float32).eps),
    "float64": float(np.finfo(np.float64).eps),
}


@dataclass
class Backend:
    name: str
    xp: Any
    dtypes: tuple[str, ...]
    _asarray: Callable[[np.ndarray, str | None], Any]
    _to_numpy: Callable[[Any], np.ndarray]
    #: the framework's loss for these options, or None (see :mod:`_native`)
    native: Any = None
    #: ``autodiff(f, x) -> (f(x), ∂f/∂x)`` through the framework's autodiff, or None
    autodiff: Callable[[Callable[[Any], Any], Any], tuple[Any, Any]] | None = None
    modules: dict[str, Any] = field(default_factory=dict)
    #: ``jit(f)``: ``jax.jit`` on JAX (one compilation instead of one per operation and shape, for
    #: tests over many shapes); the function itself elsewhere
    jit: Callable[[Callable[..., Any]], Callable[..., Any]] = lambda f: f

    def asarray(self, a: Any, dtype: str | None = None) -> Any:
        """A copy of the NumPy array ``a`` in this library (``dtype`` a name such as "bfloat16")."""
        return self._asarray(np.asarray(a), dtype)

    def to_numpy(self, a: Any) -> np.ndarray:
        """A NumPy copy; bfloat16 becomes float32 (exactly)."""
        return self._to_numpy(a)

    def eps(self, dtype: str) -> float:
        return _EPS[dtype]

    def dtype_name(self, a: Any) -> str:
        return str(a.dtype).rsplit(".", 1)[-1]

    def is_array(self, a: Any) -> bool:
        import array_api_compat

        return array_api_compat.array_namespace(a) is self.xp

    def __repr__(self) -> str:
        return f"Backend({self.name})"


def _numpy_backend() -> Backend:
    import array_api_compat.numpy as xnp

    def asarray(a: np.ndarray, dtype: str | None) -> Any:
        return np.array(a, dtype=dtype, copy=True)

    return Backend("numpy", xnp, ("float16", "float32", "float64"), asarray, lambda a: np.array(a, copy=True))


def _strict_backend() -> Backend:
    xs = pytest.importorskip("array_api_strict")

    def asarray(a: np.ndarray, dtype: str | None) -> Any:
        return xs.asarray(a, dtype=None if dtype is None else getattr(xs, dtype), copy=True)

    def to_numpy(a: Any) -> np.ndarray:
        return np.array(np.from_dlpack(a), copy=True)

    # array-api-strict has no float16 (the standard has none)
    return Backend("array-api-strict", xs, ("float32", "float64"), asarray, to_numpy)


def _torch_backend() -> Backend:
    torch = pytest.importorskip("torch")
    import _native
    import array_api_compat.torch as xt

    def asarray(a: np.ndarray, dtype: str | None) -> Any:
        t = torch.tensor(a)
        return t if dtype is None else t.to(getattr(torch, dtype))

    def to_numpy(a: Any) -> np.ndarray:
        a = a.detach()
        if a.dtype == torch.bfloat16:
            a = a.to(torch.float32)
        return a.numpy().copy()

    def autodiff(f: Callable[[Any], Any], x: Any) -> tuple[Any, Any]:
        x = x.detach().clone().requires_grad_(True)
        y = f(x)
        (g,) = torch.autograd.grad(y, x)
        return y.detach(), g

    dtypes = ("float16", "bfloat16", "float32", "float64")
    return Backend("torch", xt, dtypes, asarray, to_numpy, _native.torch_loss, autodiff, {"torch": torch})


def _jax_backend() -> Backend:
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    import _native
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)

    def asarray(a: np.ndarray, dtype: str | None) -> Any:
        return jnp.asarray(a, dtype=None if dtype is None else getattr(jnp, dtype))

    def to_numpy(a: Any) -> np.ndarray:
        if a.dtype == jnp.bfloat16:
            a = a.astype(jnp.float32)
        return np.array(a, copy=True)

    def autodiff(f: Callable[[Any], Any], x: Any) -> tuple[Any, Any]:
        return jax.value_and_grad(f)(x)

    dtypes = ("float16", "bfloat16", "float32", "float64")
    return Backend("jax", jnp, dtypes, asarray, to_numpy, _native.jax_loss, autodiff, {"jax": jax}, jax.jit)


_FACTORIES = {
    "numpy": _numpy_backend,
    "array-api-strict": _strict_backend,
    "torch": _torch_backend,
    "jax": _jax_backend,
}


def make_backend(name: str) -> Backend:
    """The backend ``name``; skips the test when its library is not installed."""
    return _FACTORIES[name]()


@pytest.fixture(scope="session", params=SELECTED)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Every selected backend, each under its own test id."""
    return make_backend(request.param)


def _framework_fixture(name: str) -> Callable[[], Backend]:
    def fixture() -> Backend:
        if name not in SELECTED:
            pytest.skip(f"backend {name} not selected (MULTIXENT_BACKENDS)")
        return make_backend(name)

    fixture.__doc__ = f"The {name} backend, for {name}-only tests; skips unless {name} is selected and installed."
    return pytest.fixture(scope="session", name=f"{name}_backend")(fixture)


torch_backend = _framework_fixture("torch")
jax_backend = _framework_fixture("jax")
