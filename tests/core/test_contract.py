"""The input contract (issue 9): integer target dtypes, plain arrays, empty axes, dtypes, precision, warnings."""

from __future__ import annotations

import warnings

import _reference as ref
import mpmath
import numpy as np
import pytest
import scipy.special
from hypothesis import given, settings
from hypothesis import strategies as st

import multixent

INTS = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
C = 5
RNG = np.random.default_rng(9)
X = RNG.normal(size=(4, C))


def _int_dtype(backend, name):
    dtype = getattr(backend.xp, name, None)
    if dtype is None:
        pytest.skip(f"{backend.name} has no {name}")
    return dtype


def _target(backend, values, name):
    _int_dtype(backend, name)
    info = np.iinfo(name)
    if backend.name == "torch":  # torch.tensor of uint64 needs the exact values as Python ints
        torch = backend.modules["torch"]
        return torch.tensor([int(v) for v in values], dtype=getattr(torch, name))
    a = np.array([int(v) for v in values], dtype=object).astype(name)
    assert all(info.min <= int(v) <= info.max for v in values)
    return backend.asarray(a)


def _row_losses(x, values):
    """float64 reference per row; NaN where the index is out of range and not -100."""
    out = []
    for row, v in zip(x, values, strict=True):
        if v == -100:
            out.append(0.0)
        elif 0 <= v < C:
            out.append(float(ref.cross_entropy(row[None], np.array([v]), reduction="none")[0]))
        else:
            out.append(np.nan)
    return np.array(out)


@pytest.mark.parametrize("name", INTS)
def test_every_integer_width(backend, name):
    info = np.iinfo(name)
    x = backend.asarray(X)
    good = [0, 1, C - 1, min(info.max, C - 2)]
    got = backend.to_numpy(multixent.cross_entropy(x, _target(backend, good, name), reduction="none"))
    np.testing.assert_allclose(got, _row_losses(X, good), rtol=1e-12)
    for bad in {info.max, info.max - 99, info.min} - set(range(C)):
        values = [0, 1, 2, bad]
        with pytest.raises(IndexError, match=rf"index {bad}\b.*\b{C}\b"):
            multixent.cross_entropy(x, _target(backend, values, name))
        if backend.name == "jax":  # traced: that row is NaN, never ignored
            f = backend.jit(lambda a, t: multixent.cross_entropy(a, t, reduction="none"))
            got = backend.to_numpy(f(x, _target(backend, values, name)))
            assert np.isnan(got[3]) and np.allclose(got[:3], _row_losses(X[:3], values[:3]))


def test_unsigned_beyond_signed_range_not_ignored_under_compile(torch_backend):
    torch = torch_backend.modules["torch"]
    t = torch.tensor([0, 1, 2, 2**64 - 100], dtype=torch.uint64)
    got = torch.compile(lambda a, b: multixent.cross_entropy(a, b, reduction="none"))(torch.tensor(X), t)
    assert torch.isnan(got[3]) and torch.isfinite(got[:3]).all()


_JAX_X64_OFF = """
import jax, jax.numpy as jnp, numpy as np, multixent
x = jnp.asarray(np.ones((2, 3), np.float32))
t = jnp.asarray(np.array([0, 2**32 - 100], np.uint32))
f = jax.jit(lambda a, b: multixent.cross_entropy(a, b, reduction="none", ignore_index=2**31 + 7))
got = np.asarray(f(x, t))
assert np.isnan(got[1]) and np.isclose(got[0], np.log(3)), got
try:
    multixent.cross_entropy(x, t)
except IndexError as e:
    assert "4294967196" in str(e), e
else:
    raise AssertionError("no IndexError")
print("ok")
"""


def test_jax_without_x64_unsigned_and_wide_ignore_index(jax_backend):
    import os
    import subprocess
    import sys

    env = {**os.environ, "JAX_ENABLE_X64": "0", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", _JAX_X64_OFF], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


_dtype_and_value = st.sampled_from(INTS).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.lists(
            st.one_of(
                st.integers(np.iinfo(n).min, np.iinfo(n).max),
                st.sampled_from([np.iinfo(n).min, np.iinfo(n).max, 0, C - 1, C, -100, -1]).filter(
                    lambda v, n=n: np.iinfo(n).min <= v <= np.iinfo(n).max
                ),
            ),
            min_size=1,
            max_size=4,
        ),
    )
)


@settings(max_examples=40, deadline=None)
@given(case=_dtype_and_value)
def test_fuzz_target_dtypes(backend, case):
    name, values = case
    x_np = X[: len(values)]
    x = backend.asarray(x_np)
    t = _target(backend, values, name)
    expected = _row_losses(x_np, values)
    if np.isnan(expected).any():
        with pytest.raises(IndexError):
            multixent.cross_entropy(x, t, reduction="none")
    else:
        got = backend.to_numpy(multixent.cross_entropy(x, t, reduction="none"))
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
    if backend.name == "jax":
        got = backend.to_numpy(backend.jit(lambda a, b: multixent.cross_entropy(a, b, reduction="none"))(x, t))
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)  # NaN where out of range


# --------------------------------------------------------------------------
# Plain arrays and clear messages

NOT_ARRAYS = {"None": None, "float": 1.5, "list": [[0.0, 1.0]]}


@pytest.mark.parametrize("kind", list(NOT_ARRAYS))
@pytest.mark.parametrize("argument", ["logits", "target", "weight", "x"])
def test_not_an_array(backend, kind, argument):
    bad = NOT_ARRAYS[kind]
    x, y = backend.asarray(X), backend.asarray(np.array([0, 1, 2, 3]))
    calls = {
        "logits": lambda: multixent.cross_entropy(bad, y),
        "target": lambda: multixent.cross_entropy(x, bad),
        "weight": lambda: multixent.cross_entropy(x, y, weight=bad),
        "x": lambda: multixent.logsumexp(bad),
    }
    if argument == "weight" and bad is None:
        pytest.skip("weight=None is the default")
    if backend.name == "jax" and kind == "float" and argument in ("target", "weight"):
        # JAX takes a Python number where an array belongs, as jnp does: a 0-d array, of the wrong shape here
        with pytest.raises(ValueError, match=rf"{argument}.*shape.*\(\)"):
            calls[argument]()
        return
    with pytest.raises(TypeError, match=rf"{argument} must be an array.*got {type(bad).__name__}") as err:
        calls[argument]()
    assert "two" not in str(err.value)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: np.ma.masked_array(X, mask=X > 1), r"logits.*numpy\.ma\.MaskedArray not supported; pass \.filled"),
        (lambda: np.asmatrix(X), r"logits.*numpy\.matrix"),
    ],
)
def test_numpy_subclasses_refused(make, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        bad = make()
    with pytest.raises(TypeError, match=message):
        multixent.cross_entropy(bad, np.array([0, 1, 2, 3]))


def test_nll_loss_float_target(backend):
    with pytest.raises(TypeError, match=r"nll_loss needs class indices") as err:
        multixent.nll_loss(backend.asarray(X), backend.asarray(np.array([0.0, 1.0, 2.0, 3.0])))
    assert "probabilit" not in str(err.value)


def test_torch_float8_sparse_meta(torch_backend):
    torch = torch_backend.modules["torch"]
    x, y = torch.tensor(X), torch.tensor([0, 1, 2, 3])
    with pytest.raises(TypeError, match=r"logits must have dtype float16, bfloat16, float32 or float64.*float8"):
        multixent.cross_entropy(x.to(torch.float8_e4m3fn), y)
    with pytest.raises(TypeError, match=r"logits is a sparse tensor"):
        multixent.cross_entropy(x.to_sparse(), y)
    # meta tensors: no values, so no index check; the result is a meta tensor of the right shape
    got = multixent.cross_entropy(x.to("meta"), y.to("meta"), reduction="none")
    assert got.is_meta and tuple(got.shape) == (4,)


def test_softcap_inf_is_no_cap(backend):
    x, y = backend.asarray(X), backend.asarray(np.array([0, 1, 2, 3]))
    got = multixent.cross_entropy(x, y, softcap=float("inf"))
    np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(multixent.cross_entropy(x, y)))


# --------------------------------------------------------------------------
# Empty axes, dtypes, NumPy results, warnings


@pytest.mark.parametrize("shape, axis", [((0,), -1), ((2, 0), -1), ((0, 3), 0), ((2, 0, 3), 1)])
def test_empty_axis(backend, shape, axis):
    x = backend.asarray(np.zeros(shape))
    expected_shape = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
    for f in (lambda a: a, backend.jit):
        lse = backend.to_numpy(f(lambda a: multixent.logsumexp(a, axis=axis))(x))
        assert lse.shape == expected_shape and np.all(lse == -np.inf)
        assert backend.to_numpy(f(lambda a: multixent.log_softmax(a, axis=axis))(x)).shape == shape
    with pytest.raises(ValueError, match="zero classes"):
        multixent.cross_entropy(backend.asarray(np.zeros((2, 0))), backend.asarray(np.array([0, 0])))


def test_empty_axis_torch_compile(torch_backend):
    torch = torch_backend.modules["torch"]
    got = torch.compile(lambda a: multixent.logsumexp(a))(torch.zeros(3, 0))
    assert got.shape == (3,) and bool((got == -torch.inf).all())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_numpy_half_logits(dtype):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    np_dtype = np.dtype(getattr(ml_dtypes, dtype) if dtype == "bfloat16" else dtype)
    x, y = X.astype(np_dtype), np.array([0, 1, 2, 3])
    x32 = x.astype(np.float32)
    loss = multixent.cross_entropy(x, y)
    assert loss.dtype == np_dtype and float(loss) == float(np.float32(multixent.cross_entropy(x32, y)).astype(np_dtype))
    loss, grad = multixent.cross_entropy_and_grad(x, y)
    assert grad.dtype == np_dtype
    lse = multixent.logsumexp(x)
    assert lse.dtype == np_dtype
    np.testing.assert_array_equal(lse.astype(np.float32), multixent.logsumexp(x32).astype(np_dtype).astype(np.float32))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_numpy_reductions_are_0d_arrays(reduction, weighted):
    w = np.arange(1.0, C + 1) if weighted else None
    got = multixent.cross_entropy(X, np.array([0, 1, 2, 3]), reduction=reduction, weight=w)
    assert type(got) is np.ndarray and got.shape == ()
    assert type(multixent.nll_loss(X, np.array([0, 1, 2, 3]), reduction=reduction, weight=w)) is np.ndarray
    assert type(multixent.cross_entropy_and_grad(X, np.array([0, 1, 2, 3]), reduction=reduction)[0]) is np.ndarray
    hidden = np.eye(X.shape[0], 3)
    linear = multixent.linear_cross_entropy(hidden, X.T[:, :3], np.array([0, 1, 2, 3]), reduction=reduction, weight=w)
    assert type(linear) is np.ndarray and linear.shape == ()


def test_no_numpy_warnings():
    rows = np.full((2, 4), -np.inf)
    big = np.zeros((1, 70000), np.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.all(multixent.logsumexp(rows) == -np.inf)
        assert np.all(np.isnan(multixent.log_softmax(rows)))
        np.testing.assert_allclose(float(multixent.logsumexp(big)[0]), np.log(70000), rtol=1e-3)
        multixent.log_softmax(big)


def test_label_smoothing_inf_off_target_is_nan(backend):
    x = backend.asarray(np.array([[0.0, np.inf, 1.0]]))
    got = multixent.cross_entropy(x, backend.asarray(np.array([0])), label_smoothing=0.1)
    assert np.isnan(backend.to_numpy(got))


# --------------------------------------------------------------------------
# logsumexp precision: SciPy's, <= 1 ulp from mpmath


def _mp_lse(row):
    with mpmath.workdps(60):
        return mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(float(v))) for v in row))


def _rows():
    rng = np.random.default_rng(1)
    rows = [rng.normal(scale=s, size=n) for s in (1, 10, 100) for n in (1, 2, 7, 30)]
    rows += [np.array([0.0, -40.0]), np.array([0.0, -700.0, -30.0]), np.array([5.0, 5.0, -60.0])]
    rows += [np.array([1e3, 1e3 - 36.0]), np.array([-1e3, -1e3 - 45.0, -1e3 - 50.0])]
    return rows


def test_logsumexp_dominated_row_exact(backend):
    got = backend.to_numpy(multixent.logsumexp(backend.asarray(np.array([0.0, -40.0]))))
    assert float(got) == 4.248354255291589e-18 == scipy.special.logsumexp([0.0, -40.0])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_logsumexp_within_one_ulp(backend, dtype):
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    for row in _rows():
        x = backend.asarray(row, dtype)
        exact = _mp_lse(backend.to_numpy(x).astype(np.float64))
        got = float(backend.to_numpy(multixent.logsumexp(x)))
        if dtype == "float64":
            ulp = float(np.spacing(np.float64(abs(float(exact)))))
        else:  # ulp of the result's dtype at the exact value
            ulp = backend.eps(dtype) * 2.0 ** np.floor(np.log2(max(abs(float(exact)), 2.0**-14)))
        assert abs(got - float(exact)) <= ulp, (dtype, row, got, exact)
        ls = backend.to_numpy(multixent.log_softmax(x)).astype(np.float64)
        tol = 4 * backend.eps(dtype) * (1 + np.abs(ls)).max()
        np.testing.assert_allclose(ls, backend.to_numpy(x).astype(np.float64) - float(exact), atol=tol, rtol=0)
