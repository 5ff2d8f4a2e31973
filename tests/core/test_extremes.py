"""Extreme values on every backend: infinities, NaN, huge offsets, ignored and empty batches.

Gradients are checked through ``cross_entropy_and_grad`` on every backend and,
on torch and JAX, through the framework's autodiff of ``cross_entropy``.
"""

from __future__ import annotations

import _reference as ref
import numpy as np
import pytest
import scipy.special
from _cases import assert_close, assert_result, make_case

import multixent
import multixent._compat

INF, NAN = np.inf, np.nan


@pytest.fixture(autouse=True, params=["exp", "exp2"])
def exp_route(request, backend, monkeypatch):
    """Each test on both of torch's float32 exponentials on the CPU (the torch adapter's ``Plan.exp_into``):
    ``exp``, and ``exp2`` of the product by ``log2 e``, which large tensors take (here every tensor)."""
    if request.param == "exp2":
        if backend.name != "torch":
            pytest.skip("the exp2 route is torch's")
        import multixent._adapters.torch as torch_adapter

        monkeypatch.setattr(torch_adapter, "_EXP2_FROM", 0)
    return request.param


def _gradients(backend, x, t, reduction="mean", upstream=None, **kw):
    """``[(how, gradient as NumPy)]``: cross_entropy_and_grad, and the framework's autodiff if any."""
    out = []
    if reduction in ("mean", "sum"):
        _, g = multixent.cross_entropy_and_grad(x, t, reduction=reduction, **kw)
        out.append(("cross_entropy_and_grad", backend.to_numpy(g)))
    if backend.autodiff is not None:
        u = None if upstream is None else backend.asarray(upstream)

        def f(z):
            loss = multixent.cross_entropy(z, t, reduction=reduction, **kw)
            return loss if u is None else backend.xp.sum(loss * u)

        _, g = backend.autodiff(f, x)
        out.append(("autodiff", backend.to_numpy(g)))
    return out


def _on(backend, kw):
    return {k: backend.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}


# --------------------------------------------------------------------------
# Ignored positions: exactly zero loss and gradient whatever their logits hold


@pytest.mark.filterwarnings("error::RuntimeWarning")  # masked values: no NumPy warnings
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("options", ["plain", "all"])
def test_ignored_rows_hold_nan_and_inf(backend, options, reduction):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4)) * 2
    y = np.array([1, -100, 3, -100, 0, -100])
    x[1] = NAN
    x[3] = [-INF, -INF, -INF, -INF]
    x[5] = [INF, -INF, NAN, 1e30]
    kw = {}
    if options == "all":
        kw = {"weight": rng.uniform(0.5, 2, 4), "label_smoothing": 0.2, "z_loss": 0.1, "softcap": 3.0}
    got = multixent.cross_entropy(backend.asarray(x), backend.asarray(y), reduction=reduction, **_on(backend, kw))
    clean = np.where((y == -100)[:, None], 0.0, x)  # the reference sanitises too; make sure it sees no NaN
    assert_close(backend, got, ref.cross_entropy(clean, y, reduction=reduction, **kw))
    if reduction == "none":
        assert np.all(backend.to_numpy(got)[y == -100] == 0.0)
    upstream = rng.normal(size=6) if reduction == "none" else None
    want = ref.cross_entropy_grad(clean, y, reduction=reduction, upstream=upstream, **kw)
    for how, g in _gradients(backend, backend.asarray(x), backend.asarray(y), reduction, upstream, **_on(backend, kw)):
        assert np.all(g[y == -100] == 0.0), how
        assert_close(backend, g, want)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # masked values: no NumPy warnings
def test_ignored_rows_hold_nan_nll_loss(backend):
    lp = scipy.special.log_softmax(np.random.default_rng(1).normal(size=(4, 3)), axis=-1)
    y = np.array([0, -100, 2, 1])
    lp_bad = lp.copy()
    lp_bad[1] = NAN
    got = multixent.nll_loss(backend.asarray(lp_bad), backend.asarray(y))
    assert_close(backend, got, ref.nll_loss(lp, y))


def test_nan_in_a_counted_row_is_nan(backend):
    x = np.random.default_rng(2).normal(size=(3, 4))
    x[1, 2] = NAN
    y = np.array([0, 1, 2])
    got = backend.to_numpy(multixent.cross_entropy(backend.asarray(x), backend.asarray(y), reduction="none"))
    assert np.isnan(got[1]) and np.all(np.isfinite(got[[0, 2]]))
    assert np.isnan(backend.to_numpy(multixent.cross_entropy(backend.asarray(x), backend.asarray(y))))


# --------------------------------------------------------------------------
# Infinite logits


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_minus_inf_on_other_classes(backend, smoothing):
    """-inf on classes other than the target: the loss of the remaining classes; zero gradient there."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 5))
    y = np.array([0, 1, 2, 4])
    x[:, 3] = -INF
    x[0, 1] = -INF
    got = multixent.cross_entropy(backend.asarray(x), backend.asarray(y), reduction="none", label_smoothing=smoothing)
    if smoothing:  # the smoothing term puts mass on the -inf classes: +inf, as torch
        assert np.all(backend.to_numpy(got) == INF)
        return
    # without the -inf classes: the same loss on the finite columns
    want = [scipy.special.logsumexp(r[np.isfinite(r)]) - r[c] for r, c in zip(x, y, strict=True)]
    assert_close(backend, got, np.array(want))
    for how, g in _gradients(backend, backend.asarray(x), backend.asarray(y)):
        assert np.all(g[~np.isfinite(x)] == 0.0), how
        finite_x = np.where(np.isfinite(x), x, -1e3)  # exp(-1e3) is 0 in float64: the same problem
        assert_close(backend, g, ref.cross_entropy_grad(finite_x, y))


def test_minus_inf_on_the_target(backend):
    x = np.array([[-INF, 0.0, 1.0], [0.5, 0.0, 1.0]])
    y = np.array([0, 1])
    got = backend.to_numpy(multixent.cross_entropy(backend.asarray(x), backend.asarray(y), reduction="none"))
    assert got[0] == INF
    assert_close(backend, got[1], scipy.special.logsumexp(x[1]) - x[1, 1])


def _naive_formula(x, y):
    """``logsumexp(x) - x_y`` with SciPy's logsumexp (shifted only by a finite max): +inf stays +inf."""
    with np.errstate(all="ignore"):
        return scipy.special.logsumexp(x, axis=-1) - x[np.arange(len(y)), y]


PLUS_INF_ROWS = {
    "on-target": ([INF, 0.0, 1.0], 0),
    "on-other-class": ([INF, 0.0, 1.0], 1),
    "two": ([INF, INF, 0.0], 0),
    "all-minus-inf": ([-INF, -INF, -INF], 0),
}


@pytest.mark.parametrize("row", list(PLUS_INF_ROWS))
def test_plus_inf_logits(backend, row):
    """+inf logits (and an all -inf row): the naive formula's value (the shift by the max only where finite).

    That is torch's value (NaN) in every row but one: +inf on another class than the target gives
    +inf (the limit of the loss), where torch's ``x - max`` gives NaN. The README documents it.
    """
    logits, target = PLUS_INF_ROWS[row]
    x, y = np.array([logits, [0.5, 0.0, 1.0]]), np.array([target, 2])
    with np.errstate(all="ignore"):
        got = backend.to_numpy(multixent.cross_entropy(backend.asarray(x), backend.asarray(y), reduction="none"))
    assert_close(backend, got, _naive_formula(x, y))
    if backend.name == "torch" and row != "on-other-class":
        native = backend.native.cross_entropy(backend.asarray(x), backend.asarray(y), reduction="none")
        assert_close(backend, got, backend.to_numpy(native))


def test_softcap_makes_infinite_logits_finite(backend):
    x = np.array([[INF, 0.0, 1.0], [-INF, 2.0, 1e30], [0.5, -0.5, 3.0]])
    y = np.array([1, 0, 2])
    cap = 4.0
    got = multixent.cross_entropy(backend.asarray(x), backend.asarray(y), reduction="none", softcap=cap)
    capped = cap * np.tanh(x / cap)
    want = scipy.special.logsumexp(capped, axis=-1) - capped[np.arange(3), y]
    assert_close(backend, got, want)
    big = np.clip(x, -1e3, 1e3)  # tanh saturates (derivative 0 in float64) as at ±inf
    for how, g in _gradients(backend, backend.asarray(x), backend.asarray(y), softcap=cap):
        assert np.all(np.isfinite(g)), how
        assert_close(backend, g, ref.cross_entropy_grad(big, y, softcap=cap))


@pytest.mark.filterwarnings("error::RuntimeWarning")  # masked values: no NumPy warnings
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_probability_zero_on_minus_inf_logit(backend, smoothing):
    """A probability target of 0 on a -inf logit contributes 0 (torch: NaN); smoothing makes it +inf."""
    x = np.array([[-INF, 0.5, 1.0, -0.3], [0.2, -INF, -INF, 1.0]])
    p = np.array([[0.0, 0.25, 0.75, 0.0], [0.6, 0.0, 0.0, 0.4]])
    got = backend.to_numpy(
        multixent.cross_entropy(backend.asarray(x), backend.asarray(p), reduction="none", label_smoothing=smoothing)
    )
    if smoothing:
        assert np.all(got == INF)
        return
    want = [-np.sum(p[i, f] * scipy.special.log_softmax(x[i, f])) for i, f in enumerate(np.isfinite(x))]
    assert_close(backend, got, np.array(want))
    for how, g in _gradients(backend, backend.asarray(x), backend.asarray(p)):
        assert np.all(g[~np.isfinite(x)] == 0.0), how
        assert_close(backend, g, ref.cross_entropy_grad(np.where(np.isfinite(x), x, -1e3), p))


# --------------------------------------------------------------------------
# Large magnitudes


@pytest.mark.parametrize("kind", ["index", "probs"])
def test_all_equal_huge_logits_give_log_c(backend, kind):
    """float32 logits all 1e8 (naive lse + m - x_y gives 0): log 3 for every row, in every dtype."""
    for dtype in backend.dtypes:
        value = 6e4 if dtype == "float16" else 1e8  # 1e8 overflows float16
        x = backend.asarray(np.full((4, 3), value), dtype)
        t = np.array([0, 1, 2, 1]) if kind == "index" else np.full((4, 3), 1 / 3)
        t = backend.asarray(t, None if kind == "index" else dtype)
        assert_result(backend, multixent.cross_entropy(x, t, reduction="none"), np.full(4, np.log(3.0)), dtype)
        loss, grad = multixent.cross_entropy_and_grad(x, t)
        assert_result(backend, loss, np.log(3.0), dtype)
        onehot = np.eye(3)[[0, 1, 2, 1]] if kind == "index" else np.full((4, 3), 1 / 3)
        assert_result(backend, grad, (1 / 3 - onehot) / 4, dtype, scale=1 / 4)


@pytest.mark.parametrize("offset", [1e4, 1e8])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_large_offsets(backend, dtype, offset):
    """Logits around 1e4 and 1e8: the loss of the logits as stored (the shift by the max keeps it)."""
    if dtype == "float32" and offset == 1e8:
        pytest.skip("float32 holds no fraction at 1e8 (covered by the all-equal test)")
    case = make_case("2d", "index", "all", seed=4)
    case.x = case.x + offset
    case.options["softcap"] = None
    x, t, kw = case.on(backend, dtype)
    exact = case.quantized(backend, dtype)
    assert_result(
        backend, multixent.cross_entropy(x, t, **kw), ref.cross_entropy(exact.x, exact.target, **exact.options), dtype
    )
    want = ref.cross_entropy_grad(exact.x, exact.target, **exact.options)
    for _, g in _gradients(backend, x, t, **kw):
        assert_close(backend, g, want, dtype)


# --------------------------------------------------------------------------
# Nothing counted: "mean" is 0 with a zero gradient (torch: NaN)


@pytest.mark.parametrize("options", ["plain", "weight-smoothing", "z_loss"])
def test_all_ignored(backend, options):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 4, 2))
    x[0, :, 0] = NAN
    y = np.full((3, 2), -100)
    kw = {"axis": 1}
    if options == "weight-smoothing":
        kw.update(weight=rng.uniform(0.5, 2, 4), label_smoothing=0.3)
    if options == "z_loss":
        kw.update(z_loss=0.5, softcap=2.0)
    xb, yb = backend.asarray(x), backend.asarray(y)
    for reduction in ("mean", "sum"):
        got = multixent.cross_entropy(xb, yb, reduction=reduction, **_on(backend, kw))
        assert backend.to_numpy(got) == 0.0
        for how, g in _gradients(backend, xb, yb, reduction, **_on(backend, kw)):
            assert g.shape == x.shape, how
            assert np.all(g == 0.0), how
    none = multixent.cross_entropy(xb, yb, reduction="none", **_on(backend, kw))
    np.testing.assert_array_equal(backend.to_numpy(none), np.zeros((3, 2)))
    assert backend.to_numpy(multixent.nll_loss(xb, yb, axis=1)) == 0.0


def test_zero_total_weight(backend):
    """Weights 0 on every target present: "mean" is 0 with a zero gradient; the z-loss still counts."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(5, 4))
    y = np.array([0, 2, 2, 0, -100])
    w = np.array([0.0, 1.0, 0.0, 2.0])
    xb, yb, wb = backend.asarray(x), backend.asarray(y), backend.asarray(w)
    assert backend.to_numpy(multixent.cross_entropy(xb, yb, weight=wb)) == 0.0
    for how, g in _gradients(backend, xb, yb, weight=wb):
        assert np.all(g == 0.0), how
    got = multixent.cross_entropy(xb, yb, weight=wb, z_loss=0.3)
    assert_close(backend, got, ref.cross_entropy(x, y, weight=w, z_loss=0.3))
    want = ref.cross_entropy_grad(x, y, weight=w, z_loss=0.3)
    for _, g in _gradients(backend, xb, yb, weight=wb, z_loss=0.3):
        assert_close(backend, g, want)


@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize(("shape", "axis"), [((0, 5), -1), ((2, 5, 0), 1), ((0, 3, 5), -1)])
def test_empty_batch(backend, kind, shape, axis):
    x = backend.asarray(np.zeros(shape))
    batch = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    t = backend.asarray(np.zeros(batch, dtype=np.int64)) if kind == "index" else backend.asarray(np.zeros(shape))
    for reduction in ("mean", "sum"):
        got = multixent.cross_entropy(x, t, axis=axis, reduction=reduction, z_loss=0.1)
        assert_result(backend, got, 0.0, "float64")
        loss, grad = multixent.cross_entropy_and_grad(x, t, axis=axis, reduction=reduction)
        assert_result(backend, loss, 0.0, "float64")
        assert tuple(grad.shape) == shape
    none = multixent.cross_entropy(x, t, axis=axis, reduction="none")
    assert tuple(none.shape) == batch
    if backend.autodiff is not None:
        _, g = backend.autodiff(lambda z: multixent.cross_entropy(z, t, axis=axis), x)
        assert tuple(g.shape) == shape
