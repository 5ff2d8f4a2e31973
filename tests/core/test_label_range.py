"""NumPy class indices beside JAX logits are range-checked by their values as given, before JAX's
conversion: without ``jax_enable_x64`` (JAX's default) JAX makes int64 int32 and uint64 uint32, which
would wrap ``2**32 + 1`` to class 1 and ``2**32 - 100`` to ``ignore_index=-100``.

The suite enables x64 for its float64 comparisons (``conftest``); these tests turn it off around each
call with ``jax.enable_x64(False)``, and one runs in a fresh process, where it is off by default.
Oracles: optax's per-row losses and ``jax.grad`` of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

import multixent

N, C, D = 5, 7, 4
#: labels that int32 (or uint32) cannot hold, as given
OUTSIDE = (2**32 + 1, 2**32 - 100, 2**31, -(2**31) - 1)
FUNCTIONS = ("cross_entropy", "nll_loss", "cross_entropy_and_grad", "linear_cross_entropy")


@pytest.fixture(scope="module")
def jax(jax_backend: Any) -> Any:
    return jax_backend.modules["jax"]


def _inputs(jax: Any) -> tuple[Any, Any, Any]:
    """float32 logits, hidden and classifier (JAX arrays made with x64 off)."""
    rng = np.random.default_rng(31)
    jnp = jax.numpy
    return (
        jnp.asarray(rng.normal(size=(N, C)), dtype=jnp.float32),
        jnp.asarray(rng.normal(size=(N, D)), dtype=jnp.float32),
        jnp.asarray(rng.normal(size=(C, D)), dtype=jnp.float32),
    )


def _call(jax: Any, function: str, labels: Any, **kwargs: Any) -> Any:
    logits, hidden, classifier = _inputs(jax)
    if function == "cross_entropy":
        return multixent.cross_entropy(logits, labels, **kwargs)
    if function == "nll_loss":
        return multixent.nll_loss(jax.nn.log_softmax(logits, axis=-1), labels, **kwargs)
    if function == "cross_entropy_and_grad":
        return multixent.cross_entropy_and_grad(logits, labels, **kwargs)
    return multixent.linear_cross_entropy(hidden, classifier, labels, **kwargs)


@pytest.mark.parametrize(
    ("value", "dtype"), [(v, d) for v in OUTSIDE for d in ("int64", "uint64") if v >= 0 or d == "int64"]
)
@pytest.mark.parametrize("function", FUNCTIONS)
def test_numpy_label_outside_the_index_dtype_is_named_as_given(jax: Any, function: str, value: int, dtype: str) -> None:
    labels = np.array([0, 3, value, 1, 2], dtype=dtype)
    before = labels.copy()
    with jax.enable_x64(False):
        assert _inputs(jax)[0].dtype == jax.numpy.float32
        with pytest.raises(IndexError, match=rf"class index {value} \(at flat position 2\)"):
            _call(jax, function, labels)
        with pytest.raises(IndexError, match=rf"class index {value} \(at flat position 2\)"):
            jax.jit(lambda: _call(jax, function, labels))()
    np.testing.assert_array_equal(labels, before)


def test_python_int_label_outside_the_index_dtype(jax: Any) -> None:
    with jax.enable_x64(False):
        logits = _inputs(jax)[0][0]
        with pytest.raises(IndexError, match=rf"class index {2**32 + 1} \(at flat position 0\)"):
            multixent.cross_entropy(logits, 2**32 + 1)


def _optax(jax: Any, logits: Any, labels: np.ndarray) -> tuple[Any, Any, Any]:
    """optax's per-row losses (0 at -100), their mean over counted rows, and its gradient."""
    import optax

    jnp = jax.numpy
    counted = labels != -100
    safe = jnp.asarray(np.where(counted, labels, 0).astype(np.int32))

    def rows(z: Any) -> Any:
        return jnp.where(counted, optax.softmax_cross_entropy_with_integer_labels(z, safe), 0.0)

    mean, grad = jax.value_and_grad(lambda z: jnp.sum(rows(z)) / counted.sum())(logits)
    return rows(logits), mean, grad


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", ["int64", "uint64"])
@pytest.mark.parametrize("function", FUNCTIONS)
def test_numpy_labels_in_range_equal_optax(jax: Any, function: str, dtype: str, jit: bool) -> None:
    labels = np.array([0, 6, -100, 3, 1] if dtype == "int64" else [0, 6, 2, 3, 1], dtype=dtype)
    wrap = jax.jit if jit else (lambda f: f)
    with jax.enable_x64(False):
        logits, hidden, classifier = _inputs(jax)
        want_rows, want_mean, want_grad = _optax(
            jax, hidden @ classifier.T if function == "linear_cross_entropy" else logits, labels
        )
        if function == "cross_entropy_and_grad":
            mean, grad = wrap(lambda: _call(jax, function, labels))()
            np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-5, atol=1e-7)
            rows = wrap(lambda: multixent.cross_entropy(logits, labels, reduction="none"))()
        else:
            mean = wrap(lambda: _call(jax, function, labels))()
            rows = wrap(lambda: _call(jax, function, labels, reduction="none"))()
        assert rows.dtype == mean.dtype == jax.numpy.float32
        np.testing.assert_allclose(np.asarray(rows), np.asarray(want_rows), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(mean), float(want_mean), rtol=1e-5)


def test_concrete_jax_labels_cast_under_jit(jax: Any) -> None:
    """A concrete JAX uint32 target closed over in ``jit``: its cast to the index dtype (int32) is traced,
    so its values are read before the cast, and ``2**31`` is named as given (not a NaN loss)."""
    with jax.enable_x64(False):
        logits = _inputs(jax)[0]
        labels = jax.numpy.asarray(np.array([0, 1, 2**31, 3, 4], dtype=np.uint32))
        with pytest.raises(IndexError, match=rf"class index {2**31} \(at flat position 2\)"):
            jax.jit(lambda z: multixent.cross_entropy(z, labels))(logits)
        ok = jax.numpy.asarray(np.array([0, 1, 6, 3, 4], dtype=np.uint32))
        want = _optax(jax, logits, np.asarray(ok).astype(np.int64))[1]
        np.testing.assert_allclose(
            float(jax.jit(lambda z: multixent.cross_entropy(z, ok))(logits)), float(want), rtol=1e-5
        )


def test_default_x64_off_in_a_fresh_process(jax: Any) -> None:
    """JAX's own default (x64 off, never enabled in the process): the issue's three reproducers."""
    script = textwrap.dedent(
        """
        import numpy as np, jax, jax.numpy as jnp, multixent as mx
        assert not jax.config.jax_enable_x64
        x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4)), dtype=jnp.float32)
        for v in (2**32 + 1, 2**32 - 100, 2**31):
            try:
                mx.cross_entropy(x, np.array([0, v]))
            except IndexError as err:
                assert f"class index {v} (at flat position 1)" in str(err), err
            else:
                raise AssertionError(f"no error for {v}")
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
