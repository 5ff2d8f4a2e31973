"""Values on every backend against the float64 reference and the framework's native loss.

Every option alone and combined, every reduction, class indices and class
probabilities, K-dimensional inputs with the class axis first, last and in the
middle (including d1 == C, where only ``axis`` tells the layouts apart),
unbatched inputs, every floating dtype, ``nll_loss``, ``log_softmax``,
``logsumexp`` and the gradient of ``cross_entropy_and_grad``.
"""

from __future__ import annotations

import _reference as ref
import numpy as np
import pytest
import scipy.special
from _cases import KINDS, LAYOUTS, OPTIONS, REDUCTIONS, applies, assert_close, assert_result, make_case

import multixent


def _check_value(backend, case, reduction, dtype="float64"):
    x, t, kw = case.on(backend, dtype)
    got = multixent.cross_entropy(x, t, reduction=reduction, **kw)
    exact = case.quantized(backend, dtype)
    want = ref.cross_entropy(exact.x, exact.target, reduction=reduction, **exact.options)
    assert_result(backend, got, want, dtype)
    if case.none_counted and reduction == "mean":
        return got  # torch's NaN there is the one deliberate difference (see test_extremes)
    if dtype == "float64" and backend.native is not None:
        native = backend.native.cross_entropy(x, t, reduction=reduction, **kw)
        if native is not None:
            assert_close(backend, got, backend.to_numpy(native), dtype)
    return got


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["2d", "kdim-axis1"])
def test_options(backend, layout, kind, option, reduction):
    if not applies(option, kind):
        pytest.skip("ignore_index applies to class indices only")
    _check_value(backend, make_case(layout, kind, option), reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts(backend, layout, kind, reduction):
    """Every layout with every option (all but ignore_index for probabilities)."""
    case = make_case(layout, kind, "all" if kind == "index" else "weight", seed=1)
    if kind == "probs":
        case.options.update(label_smoothing=0.2, z_loss=0.1, softcap=2.5)
    got = _check_value(backend, case, reduction)
    shape, axis = LAYOUTS[layout]
    batch = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
    assert tuple(got.shape) == (batch if reduction == "none" else ())


@pytest.mark.parametrize("kind", KINDS)
def test_d1_equal_to_classes_uses_axis(backend, kind):
    """(N, C, C) logits: axis=1 and axis=-1 are different losses, each the reference's."""
    case = make_case("kdim-axis1-d1eqC", kind, "weight", seed=3)
    x, t, kw = case.on(backend)
    del kw["axis"]
    first = multixent.cross_entropy(x, t, axis=1, reduction="none", **kw)
    last = multixent.cross_entropy(x, t, axis=-1, reduction="none", **kw)
    o = {k: v for k, v in case.options.items() if k != "axis"}
    want_first = ref.cross_entropy(case.x, case.target, axis=1, reduction="none", **o)
    want_last = ref.cross_entropy(case.x, case.target, axis=-1, reduction="none", **o)
    assert not np.allclose(want_first, want_last)
    assert_close(backend, first, want_first)
    assert_close(backend, last, want_last)


@pytest.mark.parametrize("axis", [-1, 0])
def test_unbatched_zero_d_target(backend, axis):
    rng = np.random.default_rng(4)
    x = rng.normal(size=6)
    for y in range(6):
        got = multixent.cross_entropy(backend.asarray(x), backend.asarray(np.asarray(y)), axis=axis)
        assert tuple(got.shape) == ()
        assert_close(backend, got, scipy.special.logsumexp(x) - x[y])
    # an ignored unbatched target: "mean" over nothing is 0
    got = multixent.cross_entropy(backend.asarray(x), backend.asarray(np.asarray(-100)))
    assert_close(backend, got, 0.0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "all"])
@pytest.mark.parametrize("kind", KINDS)
def test_dtypes(backend, kind, option, reduction):
    """Every dtype of the backend: result in the input dtype, within a few eps of the exact loss."""
    if not applies(option, kind):
        option = "weight"
    case = make_case("kdim-axis1", kind, option, seed=5)
    if option == "weight":  # probabilities with every option
        case.options.update(label_smoothing=0.1, z_loss=0.05, softcap=3.0)
    for dtype in backend.dtypes:
        _check_value(backend, case, reduction, dtype)


@pytest.mark.parametrize("itype", ["int64", "int32", "int16", "int8", "uint8"])
def test_integer_target_dtypes(backend, itype):
    """Class indices in any integer dtype (torch's own loss takes int64 and uint8)."""
    case = make_case("2d", "index", "weight", seed=6)
    x, _, kw = case.on(backend, "float32")
    got = multixent.cross_entropy(x, backend.asarray(case.target, itype), **kw)
    exact = case.quantized(backend, "float32")
    assert_result(backend, got, ref.cross_entropy(exact.x, case.target, **exact.options), "float32")
    # with ignored positions (-100 does not fit uint8: 255 there)
    ignore = 255 if itype == "uint8" else -100
    target = case.target.copy()
    target[::3] = ignore
    got = multixent.cross_entropy(x, backend.asarray(target, itype), ignore_index=ignore, **kw)
    assert_result(backend, got, ref.cross_entropy(exact.x, target, ignore_index=ignore, **exact.options), "float32")


# --------------------------------------------------------------------------
# cross_entropy_and_grad: loss and gradient against the reference (complex step)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("kind", KINDS)
def test_cross_entropy_and_grad(backend, kind, option, reduction):
    if not applies(option, kind):
        pytest.skip("ignore_index applies to class indices only")
    case = make_case("kdim-axis1", kind, option, seed=7)
    x, t, kw = case.on(backend)
    loss, grad = multixent.cross_entropy_and_grad(x, t, reduction=reduction, **kw)
    assert_result(backend, loss, ref.cross_entropy(case.x, case.target, reduction=reduction, **case.options), "float64")
    want = ref.cross_entropy_grad(case.x, case.target, reduction=reduction, **case.options)
    assert_result(backend, grad, want, "float64")
    # the same value as cross_entropy
    assert_close(backend, loss, backend.to_numpy(multixent.cross_entropy(x, t, reduction=reduction, **kw)))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", KINDS)
def test_cross_entropy_and_grad_layouts(backend, layout, kind):
    option = "all" if kind == "index" else "softcap"
    case = make_case(layout, kind, option, seed=8)
    case.options.update(z_loss=0.2)
    x, t, kw = case.on(backend)
    loss, grad = multixent.cross_entropy_and_grad(x, t, **kw)
    assert_close(backend, loss, ref.cross_entropy(case.x, case.target, **case.options))
    assert_result(backend, grad, ref.cross_entropy_grad(case.x, case.target, **case.options), "float64")


@pytest.mark.parametrize("kind", KINDS)
def test_cross_entropy_and_grad_dtypes(backend, kind):
    case = make_case("2d", kind, "all" if kind == "index" else "smoothing", seed=9)
    case.options.update(z_loss=0.1, softcap=4.0)
    for dtype in backend.dtypes:
        x, t, kw = case.on(backend, dtype)
        loss, grad = multixent.cross_entropy_and_grad(x, t, **kw)
        exact = case.quantized(backend, dtype)
        assert_result(backend, loss, ref.cross_entropy(exact.x, exact.target, **exact.options), dtype)
        assert_result(backend, grad, ref.cross_entropy_grad(exact.x, exact.target, **exact.options), dtype)


def _written_out_grad(x, y, w, smoothing, z_loss, cap, reduction, upstream=None):
    """∂loss/∂x of index targets with every option, written out in float64: per row
    ``(softmax·Σa - a)·scale + 2c·lse·softmax·scale_z``, times ``1 - tanh²`` (``a`` the weighted
    smoothed target distribution); ignored rows 0."""
    rows, classes = x.shape
    counted = y != -100
    yy = np.where(counted, y, 0)
    th = np.tanh(np.where(counted[:, None], x, 0.0) / cap)
    lse = scipy.special.logsumexp(cap * th, axis=-1)
    p = np.exp(cap * th - lse[:, None])
    a = np.broadcast_to(smoothing / classes * w, (rows, classes)).copy()
    a[np.arange(rows), yy] += (1 - smoothing) * w[yy]
    scale = np.ones(rows) if upstream is None else upstream
    scale_z = scale
    if reduction == "mean":
        scale, scale_z = scale / np.sum(w[yy] * counted), scale_z / counted.sum()
    g = (p * a.sum(-1, keepdims=True) - a) * scale[:, None] + 2 * z_loss * (lse * scale_z)[:, None] * p
    return np.where(counted[:, None], g * (1 - th**2), 0.0)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("kind", KINDS)
def test_small_blocks(backend, kind, option, monkeypatch):
    """Blocks of 1 row: the eager backends' in-place block paths, for every option and dtype."""
    if not applies(option, kind):
        pytest.skip("ignore_index applies to class indices only")
    case = make_case("kdim-axis1", kind, option, seed=12)
    classes = case.x.shape[1]
    monkeypatch.setattr(multixent._blocked, "BLOCK_ELEMENTS", classes)  # 1 row
    for dtype in backend.dtypes:
        x, t, kw = case.on(backend, dtype)
        exact = case.quantized(backend, dtype)
        for reduction in ("none", "sum"):
            got = multixent.cross_entropy(x, t, reduction=reduction, **kw)
            want = ref.cross_entropy(exact.x, exact.target, reduction=reduction, **exact.options)
            assert_result(backend, got, want, dtype)
        want = ref.cross_entropy_grad(exact.x, exact.target, reduction="sum", **exact.options)
        _, grad = multixent.cross_entropy_and_grad(x, t, reduction="sum", **kw)
        assert_result(backend, grad, want, dtype)
        if backend.autodiff is not None:

            def loss_of(z, t=t, kw=kw):
                return multixent.cross_entropy(z, t, reduction="sum", **kw)

            _, grad = backend.autodiff(loss_of, x)
            assert_result(backend, grad, want, dtype)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_gradient_block_boundaries(backend, reduction, monkeypatch):
    """Several blocks of 100 rows on eager backends, the row count not a multiple of the block."""
    rng = np.random.default_rng(10)
    classes = 64
    monkeypatch.setattr(multixent._blocked, "BLOCK_ELEMENTS", 100 * classes)
    rows = 2 * 400 + 37
    x = rng.normal(size=(rows, classes)) * 3
    y = rng.integers(0, classes, rows)
    y[::5] = -100
    w = rng.uniform(0.5, 1.5, classes)
    u = rng.normal(size=rows) if reduction == "none" else None
    smoothing, z_loss, cap = 0.1, 0.01, 5.0
    options = {"weight": w, "label_smoothing": smoothing, "z_loss": z_loss, "softcap": cap}
    # the written-out gradient agrees with the reference's complex-step gradient on a small problem
    small = slice(0, 7)
    u_small = None if u is None else u[small]
    want_small = ref.cross_entropy_grad(x[small], y[small], reduction=reduction, upstream=u_small, **options)
    got_small = _written_out_grad(x[small], y[small], w, smoothing, z_loss, cap, reduction, u_small)
    np.testing.assert_allclose(got_small, want_small, rtol=1e-12, atol=1e-14)
    want = _written_out_grad(x, y, w, smoothing, z_loss, cap, reduction, u)
    xb, yb, kw = backend.asarray(x), backend.asarray(y), {**options, "weight": backend.asarray(w)}
    if reduction != "none":
        loss, grad = multixent.cross_entropy_and_grad(xb, yb, reduction=reduction, **kw)
        assert_close(backend, loss, ref.cross_entropy(x, y, reduction=reduction, **options))
        assert_close(backend, grad, want)
    if backend.autodiff is not None:
        ub = None if u is None else backend.asarray(u)

        def f(z):
            loss = multixent.cross_entropy(z, yb, reduction=reduction, **kw)
            return loss if ub is None else backend.xp.sum(loss * ub)

        _, grad = backend.autodiff(f, xb)
        assert_close(backend, grad, want)


@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous_inputs(backend, kind):
    """Transposed and strided views (on libraries that have them) give the loss and gradient of their values."""
    case = make_case("2d", kind, "all" if kind == "index" else "weight", seed=21)
    case.options.update(z_loss=0.1, label_smoothing=0.1)
    xp = backend.xp

    # logits as the transpose of a (C, 2N) array, keeping every other row: strided and transposed
    def strided(a):
        return xp.permute_dims(backend.asarray(np.ascontiguousarray(np.repeat(a, 2, axis=0).T)), (1, 0))[::2, ...]

    x = strided(case.x)
    t = backend.asarray(np.repeat(case.target, 2))[::2] if kind == "index" else strided(case.target)
    kw = {**case.options, "weight": backend.asarray(case.weight)}
    for reduction in ("none", "mean"):
        got = multixent.cross_entropy(x, t, reduction=reduction, **kw)
        assert_close(backend, got, ref.cross_entropy(case.x, case.target, reduction=reduction, **case.options))
    loss, grad = multixent.cross_entropy_and_grad(x, t, reduction="sum", **kw)
    assert_close(backend, loss, ref.cross_entropy(case.x, case.target, reduction="sum", **case.options))
    assert_close(backend, grad, ref.cross_entropy_grad(case.x, case.target, reduction="sum", **case.options))
    if backend.autodiff is not None:
        _, grad = backend.autodiff(lambda z: multixent.cross_entropy(z, t, reduction="sum", **kw), x)
        assert_close(backend, grad, ref.cross_entropy_grad(case.x, case.target, reduction="sum", **case.options))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_unnormalised_probability_targets(backend, reduction):
    """Probability targets need not sum to 1 (torch takes any real values): the same formula."""
    rng = np.random.default_rng(22)
    x = rng.normal(size=(5, 4))
    p = rng.uniform(0.0, 3.0, size=(5, 4))
    p[1] = 0.0  # a row of zeros
    p[2, 1] = -0.5  # and a negative entry
    w = rng.uniform(0.5, 2.0, 4)
    options = {"weight": w, "label_smoothing": 0.2}
    xb, pb, kw = backend.asarray(x), backend.asarray(p), {**options, "weight": backend.asarray(w)}
    got = multixent.cross_entropy(xb, pb, reduction=reduction, **kw)
    assert_close(backend, got, ref.cross_entropy(x, p, reduction=reduction, **options))
    if backend.native is not None:
        native = backend.native.cross_entropy(xb, pb, reduction=reduction, **kw)
        if native is not None:
            assert_close(backend, got, backend.to_numpy(native))


# --------------------------------------------------------------------------
# nll_loss, log_softmax, logsumexp


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "weight", "ignore", "ignore-class1", "weight-ignore-smoothing"])
@pytest.mark.parametrize("layout", ["2d", "kdim-axis1", "kdim-last-d1eqC", "unbatched"])
def test_nll_loss(backend, layout, option, reduction):
    case = make_case(layout, "index", option, seed=11)
    case.options.pop("label_smoothing", None)
    axis = case.options["axis"]
    log_probs = scipy.special.log_softmax(case.x, axis=axis)
    lp = backend.asarray(log_probs)
    t = backend.asarray(case.target)
    kw = dict(case.options)
    if kw.get("weight") is not None:
        kw["weight"] = backend.asarray(kw["weight"])
    got = multixent.nll_loss(lp, t, reduction=reduction, **kw)
    assert_result(backend, got, ref.nll_loss(log_probs, case.target, reduction=reduction, **case.options), "float64")
    if backend.native is not None:
        native = backend.native.nll_loss(lp, t, reduction=reduction, **kw)
        all_ignored = np.all(case.target == case.options.get("ignore_index", -100))
        if native is not None and not (all_ignored and reduction == "mean"):
            assert_close(backend, got, backend.to_numpy(native))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_loss_of_log_softmax_is_cross_entropy(backend, reduction):
    case = make_case("kdim-axis1", "index", "weight-ignore-smoothing", seed=12)
    case.options.pop("label_smoothing")
    x, t, kw = case.on(backend)
    via_nll = multixent.nll_loss(multixent.log_softmax(x, axis=1), t, reduction=reduction, **kw)
    assert_close(backend, via_nll, ref.cross_entropy(case.x, case.target, reduction=reduction, **case.options))


def test_nll_loss_dtypes(backend):
    case = make_case("2d", "index", "ignore", seed=13)
    log_probs = scipy.special.log_softmax(case.x, axis=-1)
    for dtype in backend.dtypes:
        lp = backend.asarray(log_probs, dtype)
        got = multixent.nll_loss(lp, backend.asarray(case.target))
        want = ref.nll_loss(backend.to_numpy(lp).astype(np.float64), case.target)
        assert_result(backend, got, want, dtype)


@pytest.mark.parametrize(("shape", "axis"), [((6,), -1), ((4, 6), -1), ((4, 6), 0), ((2, 5, 3), 1), ((2, 3, 3), -1)])
def test_log_softmax(backend, shape, axis):
    x = np.random.default_rng(14).normal(size=shape) * 3
    for dtype in backend.dtypes:
        xb = backend.asarray(x, dtype)
        exact = backend.to_numpy(xb).astype(np.float64)
        got = multixent.log_softmax(xb, axis=axis)
        assert_result(backend, got, scipy.special.log_softmax(exact, axis=axis), dtype, factor=None)
    if backend.native is not None:
        xb = backend.asarray(x)
        assert_close(
            backend, multixent.log_softmax(xb, axis=axis), backend.to_numpy(backend.native.log_softmax(xb, axis))
        )


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize(("shape", "axis"), [((6,), -1), ((4, 6), -1), ((4, 6), 0), ((2, 5, 3), 1), ((0, 4), -1)])
def test_logsumexp(backend, shape, axis, keepdims):
    x = np.random.default_rng(15).normal(size=shape) * 3
    for dtype in backend.dtypes:
        xb = backend.asarray(x, dtype)
        exact = backend.to_numpy(xb).astype(np.float64)
        got = multixent.logsumexp(xb, axis=axis, keepdims=keepdims)
        assert_result(backend, got, scipy.special.logsumexp(exact, axis=axis, keepdims=keepdims), dtype)
    if backend.native is not None:
        xb = backend.asarray(x)
        native = backend.native.logsumexp(xb, axis, keepdims)
        assert_close(backend, multixent.logsumexp(xb, axis=axis, keepdims=keepdims), backend.to_numpy(native))


def test_logsumexp_and_log_softmax_infinities(backend):
    x = np.array(
        [
            [-np.inf, -np.inf, -np.inf],  # all -inf: lse -inf, log_softmax NaN (as x - lse)
            [np.inf, 0.0, 1.0],  # +inf: lse +inf
            [-np.inf, 0.0, 1.0],  # one -inf: finite lse, -inf log-probability
            [1e4, 1e4 + 1, 1e4 - 1],  # large offset
        ]
    )
    xb = backend.asarray(x)
    with np.errstate(all="ignore"):
        want_lse = scipy.special.logsumexp(x, axis=-1)
        want_ls = scipy.special.log_softmax(x, axis=-1)
        got_lse = multixent.logsumexp(xb)
        got_ls = backend.to_numpy(multixent.log_softmax(xb))
    assert_close(backend, got_lse, want_lse)
    assert_close(backend, got_ls[2:], want_ls[2:])
    assert np.all(np.isnan(got_ls[0]))
    assert np.isnan(got_ls[1, 0]) and np.all(got_ls[1, 1:] == -np.inf)
