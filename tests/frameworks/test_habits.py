"""Ecosystem habits (issue 13 items 1, 2 and 6): NumPy inputs beside JAX arrays, options as NumPy
scalars, 0-d arrays and tracers (with their gradients), and the error for swapped arguments.

Oracles: the float64 formula of ``_reference`` (values) and its central finite differences in
float64 (gradients with respect to an option).
"""

from __future__ import annotations

import _reference as ref
import numpy as np
import pytest
from conftest import SELECTED, make_backend

import multixent

RNG = np.random.default_rng(13)
X = RNG.normal(size=(6, 5)) * 2
Y = np.array([1, 0, 4, -100, 2, 3])
W = np.array([1.0, 2.0, 0.5, 1.5, 0.8])
H, CLS = RNG.normal(size=(6, 3)), RNG.normal(size=(5, 3))
OPTS = {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0}


def _close(got, want, rtol=1e-12):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=rtol, atol=rtol)


def _adopts_numpy(backend) -> bool:
    """Whether the framework's own functions take NumPy arrays beside its arrays (``jnp`` does)."""
    return backend.name == "jax"


# --------------------------------------------------------------------------
# 1. NumPy arrays (and Python numbers) beside the logits' arrays


def _mixed_calls(backend, x, h, cls):
    """Each public function with NumPy target and weight beside ``x`` (or ``h``, ``cls``); with its oracle."""
    ce = ref.cross_entropy(X, Y, weight=W, **OPTS)
    lin = ref.cross_entropy(H @ CLS.T, Y, weight=W, label_smoothing=0.1)
    return {
        "cross_entropy": (lambda x: multixent.cross_entropy(x, Y, weight=W, **OPTS), x, ce),
        "nll_loss": (lambda x: multixent.nll_loss(x, Y, weight=W), x, ref.nll_loss(X, Y, weight=W)),
        "cross_entropy_and_grad": (lambda x: multixent.cross_entropy_and_grad(x, Y, weight=W, **OPTS)[0], x, ce),
        "linear_cross_entropy": (
            lambda h: multixent.linear_cross_entropy(h, cls, Y, weight=W, label_smoothing=0.1),
            h,
            lin,
        ),
    }


@pytest.mark.parametrize("function", ["cross_entropy", "nll_loss", "cross_entropy_and_grad", "linear_cross_entropy"])
def test_numpy_target_and_weight_beside_logits(backend, function):
    x, h, cls = backend.asarray(X), backend.asarray(H), backend.asarray(CLS)
    f, arg, want = _mixed_calls(backend, x, h, cls)[function]
    if backend.name == "numpy" or _adopts_numpy(backend):
        _close(backend.to_numpy(f(arg)), want)  # eagerly
        _close(backend.to_numpy(backend.jit(f)(arg)), want)  # and under jax.jit, the NumPy arrays closed over
        return
    match = r"one array library.*torch\.as_tensor\(target" if backend.name == "torch" else "one array library"
    with pytest.raises(TypeError, match=match):
        f(arg)


def test_python_number_target(backend):
    """A Python int where the (0-d) target belongs: converted as ``jnp`` converts it, else a TypeError."""
    x = backend.asarray(X[0])
    if not _adopts_numpy(backend):
        with pytest.raises(TypeError, match="target must be an array"):
            multixent.cross_entropy(x, 2)
        return
    _close(backend.to_numpy(multixent.cross_entropy(x, 2)), ref.cross_entropy(X[:1], np.array([2])))
    _close(backend.to_numpy(backend.jit(lambda x: multixent.cross_entropy(x, 2))(x)), ref.cross_entropy(X[:1], [2]))


def test_jax_and_torch_stay_a_type_error(jax_backend, torch_backend):
    x_jax, y_torch = jax_backend.asarray(X), torch_backend.asarray(Y)
    with pytest.raises(TypeError, match="one array library"):
        multixent.cross_entropy(x_jax, y_torch)
    with pytest.raises(TypeError, match="one array library"):
        multixent.cross_entropy(torch_backend.asarray(X), jax_backend.asarray(Y))


def test_jit_numpy_labels_out_of_range_is_nan(jax_backend):
    """Converted inside ``jax.jit``, NumPy labels are traced values: an out-of-range index gives NaN there."""
    jax = jax_backend.modules["jax"]
    bad = np.array([1, 0, 9, -100, 2, 3])
    got = jax_backend.to_numpy(
        jax.jit(lambda x: multixent.cross_entropy(x, bad, reduction="none"))(jax_backend.asarray(X))
    )
    assert np.isnan(got[2]) and got[3] == 0.0
    _close(got[[0, 1, 4, 5]], ref.cross_entropy(X, Y, reduction="none")[[0, 1, 4, 5]])
    with pytest.raises(IndexError, match=r"\b9\b"):  # eagerly the values are read
        multixent.cross_entropy(jax_backend.asarray(X), bad)


# --------------------------------------------------------------------------
# 2. Options as NumPy scalars and concrete 0-d arrays: Python floats, range-checked


@pytest.mark.parametrize("kind", ["numpy-scalar", "numpy-0d", "backend-0d"])
def test_concrete_array_options(backend, kind):
    y_np = np.where(Y == -100, -1, Y)  # ignore_index=-1, given as an integer array
    x, y = backend.asarray(X), backend.asarray(y_np)

    def as_kind(v, dtype):
        if kind == "numpy-scalar":
            return getattr(np, dtype)(v)
        if kind == "numpy-0d":
            return np.array(v, dtype=dtype)
        return backend.asarray(np.array(v, dtype=dtype))

    options = {k: as_kind(v, "float32") for k, v in OPTS.items()}
    want = ref.cross_entropy(X, y_np, **{k: float(np.float32(v)) for k, v in OPTS.items()}, ignore_index=-1)
    ignore = as_kind(-1, "int64")
    got = multixent.cross_entropy(x, y, ignore_index=ignore, **options)
    _close(backend.to_numpy(got), want)
    loss, _ = multixent.cross_entropy_and_grad(x, y, ignore_index=ignore, **options)
    _close(backend.to_numpy(loss), want)
    h, cls = backend.asarray(H), backend.asarray(CLS)
    got = multixent.linear_cross_entropy(h, cls, y, ignore_index=ignore, **options)
    _close(
        backend.to_numpy(got),
        ref.cross_entropy(H @ CLS.T, y_np, **{k: float(np.float32(v)) for k, v in OPTS.items()}, ignore_index=-1),
    )
    _close(backend.to_numpy(multixent.nll_loss(x, y, ignore_index=ignore)), ref.nll_loss(X, y_np, ignore_index=-1))


@pytest.mark.parametrize(("name", "value"), [("label_smoothing", 1.5), ("z_loss", -0.1), ("softcap", 0.0)])
def test_concrete_array_option_out_of_range(backend, name, value):
    x, y = backend.asarray(X), backend.asarray(Y)
    for v in (np.float64(value), np.array(value), backend.asarray(np.array(value))):
        with pytest.raises(ValueError, match=rf"{name} must lie in"):
            multixent.cross_entropy(x, y, **{name: v})


def test_bad_option_types(backend):
    x, y = backend.asarray(X), backend.asarray(Y)
    with pytest.raises(TypeError, match=r"softcap (as an array must be 0-d|must be a real number or a 0-d array)"):
        multixent.cross_entropy(x, y, softcap=backend.asarray(np.array([3.0])))
    with pytest.raises(TypeError, match=r"label_smoothing.*real number"):
        multixent.cross_entropy(x, y, label_smoothing=True)
    with pytest.raises(TypeError, match=r"ignore_index must be an integer"):
        multixent.cross_entropy(x, y, ignore_index=np.float64(-100))
    with pytest.raises(TypeError, match=r"ignore_index must be an integer"):
        multixent.cross_entropy(x, y, ignore_index=np.True_)
    others = [b for b in SELECTED if b not in (backend.name, "numpy")]
    if others:  # a 0-d array of a third library (not NumPy's, not the logits')
        with pytest.raises(TypeError, match=r"softcap must be a real number or a 0-d array of the logits' library"):
            multixent.cross_entropy(x, y, softcap=make_backend(others[0]).asarray(np.array(3.0)))


# --------------------------------------------------------------------------
# 2. Traced and differentiated options: gradients against float64 finite differences


def _fd(f, v, h=1e-6):
    return (f(v + h) - f(v - h)) / (2 * h)


@pytest.mark.parametrize("name", list(OPTS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_option_gradient(backend, name, reduction):
    if backend.autodiff is None:
        pytest.skip(f"{backend.name} has no autodiff")
    value = OPTS[name]
    others = {k: v for k, v in OPTS.items() if k != name}
    x, y, w = backend.asarray(X), backend.asarray(Y), backend.asarray(W)

    def loss(s):
        out = multixent.cross_entropy(x, y, weight=w, reduction=reduction, **others, **{name: s})
        return out if reduction != "none" else (out * backend.asarray(np.arange(1.0, 7.0))).sum()

    def oracle(s):
        out = ref.cross_entropy(X, Y, weight=W, reduction=reduction, **others, **{name: s})
        return out if reduction != "none" else float((out * np.arange(1.0, 7.0)).sum())

    s = backend.asarray(np.array(value))
    for f in (loss, backend.jit(loss)):
        got, grad = backend.autodiff(f, s)
        _close(backend.to_numpy(got), oracle(value))
        _close(backend.to_numpy(grad), _fd(oracle, value), rtol=1e-7)


@pytest.mark.parametrize("name", list(OPTS))
def test_linear_option_gradient(backend, name):
    if backend.autodiff is None:
        pytest.skip(f"{backend.name} has no autodiff")
    value, others = OPTS[name], {k: v for k, v in OPTS.items() if k != name}
    h, cls, y = backend.asarray(H), backend.asarray(CLS), backend.asarray(Y)

    def oracle(s):
        return ref.cross_entropy(H @ CLS.T, Y, **others, **{name: s})

    for reduction in ("mean", "none"):

        def loss(s, r=reduction):
            out = multixent.linear_cross_entropy(h, cls, y, chunk_size=2, reduction=r, **others, **{name: s})
            return out if r == "mean" else out.sum() / 5  # 5 counted rows: the mean

        got, grad = backend.autodiff(loss, backend.asarray(np.array(value)))
        _close(backend.to_numpy(got), oracle(value))
        _close(backend.to_numpy(grad), _fd(oracle, value), rtol=1e-7)


def test_option_and_logits_gradients_together(backend):
    """With tensor/traced options, the logits' gradient is still the closed form's (as with float options)."""
    if backend.autodiff is None:
        pytest.skip(f"{backend.name} has no autodiff")
    y = backend.asarray(Y)
    s = backend.asarray(np.array(3.0))
    _, g_traced = backend.autodiff(lambda x: multixent.cross_entropy(x, y, softcap=s, z_loss=0.01), backend.asarray(X))
    _, g_float = backend.autodiff(lambda x: multixent.cross_entropy(x, y, softcap=3.0, z_loss=0.01), backend.asarray(X))
    _close(backend.to_numpy(g_traced), backend.to_numpy(g_float), rtol=1e-12)


def test_traced_options_in_cross_entropy_and_grad(backend):
    x, y = backend.asarray(X), backend.asarray(Y)
    options = {k: backend.asarray(np.array(v)) for k, v in OPTS.items()}
    loss, grad = backend.jit(lambda x, o: multixent.cross_entropy_and_grad(x, y, **o))(x, options)
    _close(backend.to_numpy(loss), ref.cross_entropy(X, Y, **OPTS))
    _close(backend.to_numpy(grad), ref.grad(lambda z: ref.cross_entropy(z, Y, **OPTS), X), rtol=1e-12)


@pytest.mark.parametrize(("name", "value"), [("label_smoothing", 1.5), ("z_loss", -0.1), ("softcap", -1.0)])
def test_traced_option_out_of_range_is_nan(backend, name, value):
    """Out of range and traced (jit) or differentiated: NaN values and gradients, never a wrong number."""
    if backend.autodiff is None:
        pytest.skip(f"{backend.name}: its options are always concrete (range-checked: ValueError)")
    x, y = backend.asarray(X), backend.asarray(Y)
    for reduction in ("mean", "none"):
        f = backend.jit(lambda s, r=reduction: multixent.cross_entropy(x, y, reduction=r, **{name: s}).sum())
        got, grad = backend.autodiff(f, backend.asarray(np.array(value)))
        assert np.isnan(backend.to_numpy(got)) and np.isnan(backend.to_numpy(grad))
    got, grad = backend.autodiff(
        backend.jit(lambda s: multixent.linear_cross_entropy(backend.asarray(H), backend.asarray(CLS), y, **{name: s})),
        backend.asarray(np.array(value)),
    )
    assert np.isnan(backend.to_numpy(got)) and np.isnan(backend.to_numpy(grad))


def test_jax_traced_option_logits_gradient_is_nan_out_of_range(jax_backend):
    jax = jax_backend.modules["jax"]
    x, y = jax_backend.asarray(X), jax_backend.asarray(Y)
    g = jax.jit(jax.grad(lambda x, s: multixent.cross_entropy(x, y, softcap=s)))(x, -2.0)
    counted = Y != -100
    assert np.all(np.isnan(jax_backend.to_numpy(g)[counted])) and np.all(jax_backend.to_numpy(g)[~counted] == 0)


def test_torch_compile_tensor_option(torch_backend):
    torch = torch_backend.modules["torch"]
    x, y = torch_backend.asarray(X), torch_backend.asarray(Y)
    f = torch.compile(lambda x, s, z: multixent.cross_entropy(x, y, softcap=s, z_loss=z), fullgraph=True)
    _close(
        f(x, torch.tensor(3.0, dtype=torch.float64), torch.tensor(0.01, dtype=torch.float64)).numpy(),
        ref.cross_entropy(X, Y, softcap=3.0, z_loss=0.01),
    )
    assert torch.isnan(f(x, torch.tensor(-3.0, dtype=torch.float64), torch.tensor(0.01, dtype=torch.float64)))
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    f(x, s, torch.tensor(0.01, dtype=torch.float64)).backward()
    _close(s.grad.numpy(), _fd(lambda v: ref.cross_entropy(X, Y, softcap=v, z_loss=0.01), 3.0), rtol=1e-7)


def test_float32_option_keeps_logits_dtype(backend):
    """An option array never promotes: float32 logits with a float64 traced option give float32."""
    if backend.autodiff is None:
        pytest.skip(f"{backend.name}: options are read as floats")
    x, y = backend.asarray(X, "float32"), backend.asarray(Y)
    got, grad = backend.autodiff(lambda s: multixent.cross_entropy(x, y, softcap=s), backend.asarray(np.array(3.0)))
    assert backend.dtype_name(got) == "float32" and backend.dtype_name(grad) == "float64"


# --------------------------------------------------------------------------
# 6. Swapped arguments


def test_float_labels_say_cast_or_swapped(backend):
    """Labels cast to float (as Keras casts y_true), of the logits' batch shape or (N, 1)."""
    x = backend.asarray(X)
    for labels in (np.abs(Y).astype(np.float32) % 5, (np.abs(Y) % 5).astype(np.float32)[:, None]):
        with pytest.raises(ValueError, match=r"class indices stored as floats.*integer dtype.*may be swapped"):
            multixent.cross_entropy(x, backend.asarray(labels))


def test_keras_order_says_swapped(backend):
    """``cross_entropy(y_true, y_pred)``: float labels where the logits belong, logits as the target."""
    labels = (np.abs(Y) % 5).astype(np.float32)
    x = backend.asarray(X, "float32")
    for y_true in (labels, labels[:, None]):
        with pytest.raises(
            ValueError, match=r"logits hold only integers.*arguments may be swapped.*\(logits, target\)"
        ):
            multixent.cross_entropy(backend.asarray(y_true), x)
    with pytest.raises(TypeError, match=r"logits must have a real floating dtype.*arguments may be swapped"):
        multixent.cross_entropy(backend.asarray(np.abs(Y) % 5), x)
