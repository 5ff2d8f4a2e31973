"""Property-based tests (hypothesis): random shapes, class axes, options and values against the reference.

Each backend draws its own examples. On JAX the calls run under ``jax.jit``
(``backend.jit``): in eager mode every new shape costs a compilation of each
operation; eager JAX is covered by the other modules.
"""

from __future__ import annotations

import _reference as ref
import numpy as np
import scipy.special
from _cases import assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import multixent

MAX_EXAMPLES = {"numpy": 60, "array-api-strict": 40, "torch": 60, "jax": 25}


def _settings(backend):
    return settings(
        max_examples=MAX_EXAMPLES.get(backend.name, 30),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        derandomize=False,
    )


@st.composite
def problems(draw, max_elements=120):
    """(logits, target, options) as NumPy arrays: any shape, class axis, target kind and options."""
    ndim = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(0 if ndim > 1 else 1, 4), min_size=ndim, max_size=ndim))
    axis = draw(st.integers(-ndim, ndim - 1))
    shape[axis] = draw(st.integers(1, 6))  # C >= 1
    if int(np.prod(shape)) > max_elements:
        shape = [min(s, 2) for s in shape]
        shape[axis] = min(shape[axis], 6)
    shape = tuple(shape)
    classes = shape[axis]
    batch = shape[: axis % ndim] + shape[axis % ndim + 1 :]
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 5.0, 30.0]))
    offset = draw(st.sampled_from([0.0, 0.0, -50.0, 1e3]))
    x = rng.normal(size=shape) * scale + offset
    options = {"axis": axis}
    kind = draw(st.sampled_from(["index", "probs"]))
    if kind == "index":
        target = rng.integers(0, classes, size=batch)
        ignore = draw(st.sampled_from([-100, -1, 0, classes]))
        if ignore != -100:
            options["ignore_index"] = ignore
        mask = rng.random(batch) < draw(st.sampled_from([0.0, 0.3, 1.0]))
        target = np.where(mask, ignore, target).astype(np.int64)
    else:
        p = rng.random(size=(*batch, classes)) * (rng.random(size=(*batch, classes)) > 0.3)
        p = p / np.maximum(p.sum(-1, keepdims=True), 1e-12)
        target = np.moveaxis(p, -1, axis)
    if draw(st.booleans()):
        options["weight"] = rng.uniform(0.0, 2.0, classes)
    smoothing = draw(st.sampled_from([0.0, 0.0, 0.1, 1.0, None]))
    options["label_smoothing"] = float(rng.uniform()) if smoothing is None else smoothing
    options["z_loss"] = draw(st.sampled_from([0.0, 0.0, 1e-3, 0.5]))
    options["softcap"] = draw(st.sampled_from([None, None, 0.5, 3.0, 30.0]))
    return x, np.asarray(target), options


def _loss_scale(want):
    """Losses are differences lse - x_y of O(1) terms: absolute errors are judged on a scale of at least 1."""
    return max(float(np.max(np.abs(want), initial=0.0)), 1.0)


def _on(backend, x, target, options):
    kw = dict(options)
    if kw.get("weight") is not None:
        kw["weight"] = backend.asarray(kw["weight"])
    return backend.asarray(x), backend.asarray(target), kw


def test_cross_entropy_matches_reference(backend):
    @_settings(backend)
    @given(problem=problems(), reduction=st.sampled_from(["none", "sum", "mean"]))
    def check(problem, reduction):
        x, target, options = problem
        xb, tb, kw = _on(backend, x, target, options)
        got = backend.jit(lambda x, t: multixent.cross_entropy(x, t, reduction=reduction, **kw))(xb, tb)
        want = ref.cross_entropy(x, target, reduction=reduction, **options)
        assert tuple(got.shape) == np.shape(want)
        assert_close(backend, got, want, factor=1024, scale=_loss_scale(want))

    check()


def test_cross_entropy_and_grad_matches_reference(backend):
    @_settings(backend)
    @given(problem=problems(max_elements=60), reduction=st.sampled_from(["sum", "mean"]))
    def check(problem, reduction):
        x, target, options = problem
        xb, tb, kw = _on(backend, x, target, options)
        loss, grad = backend.jit(lambda x, t: multixent.cross_entropy_and_grad(x, t, reduction=reduction, **kw))(xb, tb)
        want_loss = ref.cross_entropy(x, target, reduction=reduction, **options)
        assert_close(backend, loss, want_loss, factor=1024, scale=_loss_scale(want_loss))
        want = ref.cross_entropy_grad(x, target, reduction=reduction, **options)
        # Absolute errors are judged on the scale of a probability per row (1/rows): the gradient
        # p - a cancels in entries near 0 (p = 1 - 5e-10 against a = 1 leaves an O(eps) error), and
        # a saturated softcap's 1 - tanh² is 0 where the exact derivative is ~1e-90.
        rows = max(1, x.size // x.shape[options["axis"]])
        scale = max(float(np.max(np.abs(want), initial=0.0)), 1.0 / rows)
        assert_close(backend, grad, want, factor=1024, scale=scale)
        if backend.autodiff is not None:

            def autodiff(x, t):
                return backend.autodiff(lambda z: multixent.cross_entropy(z, t, reduction=reduction, **kw), x)

            _, g = backend.jit(autodiff)(xb, tb)
            assert_close(backend, g, want, factor=1024, scale=scale)

    check()


def test_log_softmax_and_logsumexp_match_scipy(backend):
    @_settings(backend)
    @given(
        shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
        data=st.data(),
        scale=st.sampled_from([1e-2, 1.0, 100.0]),
        seed=st.integers(0, 2**32 - 1),
    )
    def check(shape, data, scale, seed):
        axis = data.draw(st.integers(-len(shape), len(shape) - 1))
        keepdims = data.draw(st.booleans())
        x = np.random.default_rng(seed).normal(size=shape) * scale
        xb = backend.asarray(x)
        got = backend.jit(lambda x: multixent.log_softmax(x, axis=axis))(xb)
        assert_close(backend, got, scipy.special.log_softmax(x, axis=axis))
        got = backend.jit(lambda x: multixent.logsumexp(x, axis=axis, keepdims=keepdims))(xb)
        assert_close(backend, got, scipy.special.logsumexp(x, axis=axis, keepdims=keepdims))

    check()
