"""torch.func transforms, batched gradients, and the gradient with respect to the class weights.

torch (skipped unless selected): ``torch.func.grad``, ``vmap`` (of the loss, of
its gradient, per-sample gradients of a model through ``functional_call``),
``jacrev``, ``jacfwd``, ``hessian``, ``jvp`` and ``autograd.grad(...,
is_grads_batched=True)``, each against the same transform of the native loss
(``F.cross_entropy``; with z_loss/softcap written around it in float64 torch
operations, :mod:`_native`); ``gradcheck``/``gradgradcheck`` with batched
gradients and forward mode, for every option and for the option combinations of
torch's own ``CrossEntropyLoss``/``NLLLoss`` module samples.

Every backend with autodiff (torch, JAX): the gradient with respect to
``weight`` against the complex-step derivative of the float64 reference (torch
refuses to differentiate its weights, so it cannot be the oracle).
"""

from __future__ import annotations

import _reference as ref
import numpy as np
import pytest
from _cases import KINDS, OPTIONS, REDUCTIONS, applies, assert_close, make_case

import multixent

#: options of the transform tests (every one of :data:`_cases.OPTIONS` but the redundant ones)
TRANSFORM_OPTIONS = ["plain", "weight", "ignore", "ignore-class1", "smoothing", "z_loss", "softcap", "all"]
TRANSFORMS = ["grad", "vmap", "vmap_grad", "jacrev", "jacfwd", "hessian", "jvp", "is_grads_batched"]


def _case(option, kind, layout="kdim-axis1", seed=0):
    """The case; for probability targets an option set's "ignore" flag is dropped (it applies to indices)."""
    if not applies(option, kind) and option.startswith("ignore"):
        pytest.skip("ignore_index applies to class indices only")
    return make_case(layout, kind, option, seed=seed)


def _upstream(torch, shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _apply(torch, transform, loss, x):
    """``transform`` of ``loss`` (a function of the logits) at ``x``, as a tuple of tensors."""
    tf = torch.func
    out_shape = loss(x).shape
    u = _upstream(torch, out_shape)

    def scalar(z):
        return (loss(z) * u).sum()

    v = _upstream(torch, x.shape, seed=2)
    xs = torch.stack([x, x * 0.5 + v, x - v])  # a batch of three logits
    if transform == "grad":
        return (tf.grad(scalar)(x),)
    if transform == "vmap":
        return (tf.vmap(loss)(xs),)
    if transform == "vmap_grad":
        return (tf.vmap(tf.grad(scalar))(xs),)
    if transform == "jacrev":
        return (tf.jacrev(loss)(x),)
    if transform == "jacfwd":
        return (tf.jacfwd(loss)(x),)
    if transform == "hessian":
        return (tf.hessian(scalar)(x),)
    if transform == "jvp":
        return tf.jvp(loss, (x,), (v,))
    assert transform == "is_grads_batched"
    xr = x.detach().clone().requires_grad_()
    y = loss(xr)
    cotangents = torch.stack([_upstream(torch, y.shape, seed=s) for s in range(3)])
    return torch.autograd.grad(y, xr, cotangents, is_grads_batched=True)


def _assert_all_close(tb, got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert_close(tb, g, tb.to_numpy(w))


@pytest.mark.slow
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", TRANSFORM_OPTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_transform_matches_native(torch_backend, kind, option, reduction, transform):
    tb = torch_backend
    torch = tb.modules["torch"]
    case = _case(option, kind)
    x, t, kw = case.on(tb)
    got = _apply(torch, transform, lambda z: multixent.cross_entropy(z, t, reduction=reduction, **kw), x)
    want = _apply(torch, transform, lambda z: tb.native.cross_entropy(z, t, reduction=reduction, **kw), x)
    _assert_all_close(tb, got, want)


@pytest.mark.parametrize("transform", ["grad", "jacrev", "jacfwd", "hessian", "jvp"])
@pytest.mark.parametrize("option", ["plain", "ignore", "all"])
def test_transform_with_captured_index_target(torch_backend, option, transform):
    """(N, C) logits and a plain 1-D index tensor captured by the transformed function (the
    layout the class-index check reads directly; no reshape on the way), against the native loss."""
    tb = torch_backend
    torch = tb.modules["torch"]
    x, t, kw = _case(option, "index", layout="2d").on(tb)
    got = _apply(torch, transform, lambda z: multixent.cross_entropy(z, t, **kw), x)
    want = _apply(torch, transform, lambda z: tb.native.cross_entropy(z, t, **kw), x)
    _assert_all_close(tb, got, want)


@pytest.mark.parametrize("transform", ["grad", "jacfwd", "vmap_grad"])
@pytest.mark.parametrize("option", ["plain", "weight", "smoothing", "all"])
def test_transform_probability_target(torch_backend, option, transform):
    """Transforms with respect to probability targets (forward mode through the jvp's ``ṫ``)."""
    tb = torch_backend
    torch = tb.modules["torch"]
    case = _case(option, "probs")
    x, t, kw = case.on(tb)
    got = _apply(torch, transform, lambda p: multixent.cross_entropy(x, p, reduction="none", **kw), t)
    want = _apply(torch, transform, lambda p: tb.native.cross_entropy(x, p, reduction="none", **kw), t)
    _assert_all_close(tb, got, want)


@pytest.mark.parametrize("option", ["plain", "ignore", "all"])
def test_vmap_over_logits_and_class_indices(torch_backend, option):
    """Both batched: the class indices cannot be read, so they are checked by the math (NaN if out of range)."""
    tb = torch_backend
    torch = tb.modules["torch"]
    cases = [_case(option, "index", "2d", seed=s) for s in range(3)]
    kw = cases[0].on(tb)[2]
    x = torch.stack([c.on(tb)[0] for c in cases])
    t = torch.stack([c.on(tb)[1] for c in cases])
    got = torch.func.vmap(lambda z, y: multixent.cross_entropy(z, y, **kw))(x, t)
    # the oracle sample by sample: F.cross_entropy's smoothing with ignore_index cannot be vmapped over the target
    want = torch.stack([tb.native.cross_entropy(z, y, **kw) for z, y in zip(x, t, strict=True)])
    assert_close(tb, got, tb.to_numpy(want))
    grad = torch.func.vmap(torch.func.grad(lambda z, y: multixent.cross_entropy(z, y, **kw)))(x, t)
    native_grad = torch.func.grad(lambda z, y: tb.native.cross_entropy(z, y, **kw))
    want_grad = torch.stack([native_grad(z, y) for z, y in zip(x, t, strict=True)])
    assert_close(tb, grad, tb.to_numpy(want_grad))
    bad = t.clone()
    bad[1, 2] = x.shape[-1] + 3  # out of range: NaN on that sample, the others unchanged
    out = torch.func.vmap(lambda z, y: multixent.cross_entropy(z, y, reduction="none", **kw))(x, bad)
    assert torch.isnan(out[1, 2]) and not torch.isnan(out[0]).any()


@pytest.mark.parametrize("option", ["plain", "weight-ignore-smoothing", "all"])
@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_gradients_of_a_model(torch_backend, kind, option):
    """``vmap(grad(...))`` over samples through ``functional_call``: the per-sample-gradient recipe."""
    tb = torch_backend
    torch = tb.modules["torch"]
    case = _case(option, kind, "2d")
    _, t, kw = case.on(tb)
    g = torch.Generator().manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, case.x.shape[-1]))
    model = model.to(torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    data = torch.randn(t.shape[0], 6, generator=g, dtype=torch.float64)

    def per_sample(fn):
        def loss(p, sample, target):
            logits = torch.func.functional_call(model, p, (sample[None],))
            return fn(logits, target[None], **kw)

        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, data, t)

    got, want = per_sample(multixent.cross_entropy), per_sample(tb.native.cross_entropy)
    for name in params:
        assert_close(tb, got[name], tb.to_numpy(want[name]))


def test_cross_entropy_and_grad_and_nll_loss_under_vmap(torch_backend):
    tb = torch_backend
    torch = tb.modules["torch"]
    case = _case("weight-ignore-smoothing", "index", "kdim-axis1")
    x, t, kw = case.on(tb)
    xs = torch.stack([x, 2 * x, -x])
    loss, grad = torch.func.vmap(lambda z: multixent.cross_entropy_and_grad(z, t, **kw))(xs)
    want = torch.func.vmap(lambda z: tb.native.cross_entropy(z, t, **kw))(xs)
    want_grad = torch.func.vmap(torch.func.grad(lambda z: tb.native.cross_entropy(z, t, **kw)))(xs)
    assert_close(tb, loss, tb.to_numpy(want))
    assert_close(tb, grad, tb.to_numpy(want_grad))
    lp = torch.log_softmax(xs, dim=2)
    nll_kw = {"axis": 1, "weight": kw["weight"]}
    for transform in (torch.func.vmap, lambda f: torch.func.vmap(torch.func.grad(f))):
        got = transform(lambda z: multixent.nll_loss(z, t, **nll_kw))(lp)
        ref_ = transform(lambda z: tb.native.nll_loss(z, t, **nll_kw))(lp)
        assert_close(tb, got, tb.to_numpy(ref_))


# --------------------------------------------------------------------------
# gradcheck / gradgradcheck with batched gradients and forward mode


def _gradchecks(torch, fn, inputs):
    kwargs = {"check_batched_grad": True, "check_forward_ad": True, "check_batched_forward_grad": True}
    assert torch.autograd.gradcheck(fn, inputs, **kwargs)
    assert torch.autograd.gradgradcheck(fn, inputs, check_batched_grad=True, check_fwd_over_rev=True)


@pytest.mark.slow
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "weight", "ignore", "smoothing", "z_loss", "softcap", "all"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_batched(torch_backend, kind, option, reduction):
    """Logits, probability targets and class weights all differentiated (float64)."""
    tb = torch_backend
    torch = tb.modules["torch"]
    case = _case(option, kind, "kdim-axis1")
    x, t, kw = case.on(tb)
    weight = kw.pop("weight", None)
    inputs = [x.requires_grad_()]
    if kind == "probs":
        inputs.append(t.requires_grad_())
    if weight is not None:
        inputs.append(weight.requires_grad_())

    def fn(*args):
        z, rest = args[0], list(args[1:])
        p = rest.pop(0) if kind == "probs" else t
        w = rest.pop(0) if weight is not None else None
        return multixent.cross_entropy(z, p, weight=w, reduction=reduction, **kw)

    _gradchecks(torch, fn, tuple(inputs))


def _module_samples():
    """The option combinations and shapes of torch's CrossEntropyLoss/NLLLoss module samples (own data)."""
    rng = np.random.default_rng(5)
    ce_options = {
        "": {},
        "weights": {"weight": rng.uniform(0.2, 2.0, 3)},
        "ignore_index": {"ignore_index": 1},
        "label_smoothing": {"label_smoothing": 0.15},
        "ignore_index_label_smoothing": {"ignore_index": 1, "label_smoothing": 0.15},
    }
    samples = []
    for reduction in REDUCTIONS:
        for desc, options in ce_options.items():
            shapes = [(2, 3, 5, 5), (2, 3, 5), (2, 3), (1, 3, 2, 2, 2, 2)]
            for shape in shapes:
                target = rng.integers(0, 3, size=shape[:1] + shape[2:])
                samples.append(
                    ("cross_entropy", f"{len(shape)}d_{desc}_{reduction}", shape, target, options, reduction)
                )
            if "ignore_index" not in options:
                for shape in [(5, 3, 4, 2), (5, 3, 4), (5, 3), (3,)]:
                    p = rng.dirichlet(np.ones(3), size=(shape[0], *shape[2:]) if len(shape) > 1 else None)
                    p = np.moveaxis(p, -1, 1) if len(shape) > 1 else p
                    samples.append(
                        ("cross_entropy", f"prob_{len(shape)}d_{desc}_{reduction}", shape, p, options, reduction)
                    )
                samples.append(
                    ("cross_entropy", f"no_batch_dim_{desc}_{reduction}", (3,), np.array(1), options, reduction)
                )
    nll_options = {
        "": {},
        "reduction_sum": {"reduction": "sum"},
        "reduction_none": {"reduction": "none"},
        "ignore_index": {"ignore_index": 2},
        "weights": {"weight": rng.uniform(0.2, 2.0, 4)},
        "weights_ignore_index": {"weight": rng.uniform(0.2, 2.0, 4), "ignore_index": 2},
        "weights_ignore_index_neg": {"weight": rng.uniform(0.2, 2.0, 4), "ignore_index": -1},
    }
    for desc, options in nll_options.items():
        options = dict(options)
        reduction = options.pop("reduction", "mean")
        for shape in [(15, 4), (2, 4, 5, 5)]:
            target = rng.integers(0, 4, size=shape[:1] + shape[2:])
            samples.append(("nll_loss", f"{len(shape)}d_{desc}", shape, target, options, reduction))
    return samples


MODULE_SAMPLES = _module_samples()


@pytest.mark.slow
@pytest.mark.parametrize("sample", MODULE_SAMPLES, ids=[f"{s[0]}-{s[1]}" for s in MODULE_SAMPLES])
def test_module_samples_gradcheck(torch_backend, sample):
    """torch's module tests run each sample through gradcheck/gradgradcheck with batched gradients."""
    tb = torch_backend
    torch = tb.modules["torch"]
    name, _, shape, target, options, reduction = sample
    rng = np.random.default_rng(len(shape))
    x = tb.asarray(rng.normal(size=shape) * 2)
    if name == "nll_loss":
        x = torch.log_softmax(x, dim=1 if len(shape) > 1 else 0)
    probs = np.issubdtype(target.dtype, np.floating)
    t = tb.asarray(target)
    kw = {k: tb.asarray(v) if k == "weight" else v for k, v in options.items()}
    kw.update(axis=1 if len(shape) > 1 else 0, reduction=reduction)
    fn = getattr(multixent, name)
    native = getattr(tb.native, name)
    assert_close(tb, fn(x, t, **kw), tb.to_numpy(native(x, t, **kw)))
    inputs = (x.requires_grad_(), t.requires_grad_()) if probs else (x.requires_grad_(),)
    _gradchecks(torch, lambda z, *p: fn(z, p[0] if probs else t, **kw), inputs)


# --------------------------------------------------------------------------
# Gradient with respect to the class weights: every backend with autodiff


def _weight_loss(fn, case, x, t, reduction, u):
    kw = {k: v for k, v in case.options.items() if k != "weight"}

    def loss(w):
        out = fn(x, t, weight=w, reduction=reduction, **kw)
        return out if u is None else (out * u).sum()

    return loss


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["weight", "weight-ignore-smoothing", "all"])
@pytest.mark.parametrize("kind", KINDS)
def test_weight_gradient(backend, kind, option, reduction):
    """``∂loss/∂w`` through the framework's autodiff, against the complex-step derivative of the reference."""
    if backend.autodiff is None:
        pytest.skip(f"{backend.name} has no autodiff")
    case = _case(option, kind, "kdim-axis1", seed=4)
    x, t, kw = case.on(backend)
    u = None
    if reduction == "none":
        shape = ref.cross_entropy(case.x, case.target, reduction="none", axis=case.options["axis"]).shape
        u = np.random.default_rng(2).normal(size=shape)
    want = ref.grad(_weight_loss(ref.cross_entropy, case, case.x, case.target, reduction, u), case.weight)
    ub = None if u is None else backend.asarray(u)
    value, got = backend.autodiff(_weight_loss(multixent.cross_entropy, case, x, t, reduction, ub), kw["weight"])
    assert_close(backend, value, _weight_loss(ref.cross_entropy, case, case.x, case.target, reduction, u)(case.weight))
    assert_close(backend, got, want)
    if reduction != "none":  # the loss of cross_entropy_and_grad is differentiable in the weights too
        and_grad = _weight_loss(lambda *a, **k: multixent.cross_entropy_and_grad(*a, **k)[0], case, x, t, reduction, ub)
        assert_close(backend, backend.autodiff(and_grad, kw["weight"])[1], want)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_loss_weight_gradient(backend, reduction):
    if backend.autodiff is None:
        pytest.skip(f"{backend.name} has no autodiff")
    case = make_case("kdim-axis1", "index", "weight-ignore-smoothing", seed=6)
    case.options.pop("label_smoothing")
    case.x = case.x - np.log(np.exp(case.x).sum(axis=1, keepdims=True))  # log-probabilities
    x, t, kw = case.on(backend)
    u = None if reduction != "none" else np.random.default_rng(2).normal(size=case.target.shape)
    ub = None if u is None else backend.asarray(u)
    want = ref.grad(_weight_loss(ref.nll_loss, case, case.x, case.target, reduction, u), case.weight)
    got = backend.autodiff(_weight_loss(multixent.nll_loss, case, x, t, reduction, ub), kw["weight"])[1]
    assert_close(backend, got, want)


def test_weight_gradient_issue_example(backend):
    """The example of issue 9: torch and jax gave [-0.612, -0.612, 0]."""
    if backend.autodiff is None:
        pytest.skip(f"{backend.name} has no autodiff")
    x = backend.asarray(np.array([[1.0, 2, 3], [1, 0, 0]]))
    t = backend.asarray(np.array([0, 1]))
    w = backend.asarray(np.array([1.0, 2, 3]))
    got = backend.autodiff(lambda w: multixent.cross_entropy(x, t, weight=w), w)[1]
    lse = np.log(np.exp([1.0, 2, 3]).sum()), np.log(np.exp([1.0, 0, 0]).sum())
    nll = np.array([lse[0] - 1.0, lse[1] - 0.0])
    loss = (1 * nll[0] + 2 * nll[1]) / 3
    want = np.array([(nll[0] - loss) / 3, (nll[1] - loss) / 3, 0.0])  # d(Σ w_y nll / Σ w_y)/dw
    assert_close(backend, got, want)
    np.testing.assert_allclose(want, [0.190, -0.095, 0.0], atol=5e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_func_weight_gradient(torch_backend, kind):
    """torch.func.grad, jacfwd (forward mode) and vmap with respect to the class weights."""
    tb = torch_backend
    torch = tb.modules["torch"]
    case = _case("all", kind, "kdim-axis1", seed=7)
    x, t, kw = case.on(tb)
    w = kw.pop("weight")
    opts = {k: v for k, v in case.options.items() if k != "weight"}
    want = ref.grad(lambda v: ref.cross_entropy(case.x, case.target, weight=v, **opts), case.weight)
    assert_close(tb, torch.func.grad(lambda v: multixent.cross_entropy(x, t, weight=v, **kw))(w), want)
    assert_close(tb, torch.func.jacfwd(lambda v: multixent.cross_entropy(x, t, weight=v, **kw))(w), want)
    jac = torch.func.jacrev(lambda v: multixent.cross_entropy(x, t, weight=v, reduction="none", **kw))(w)
    rows = ref.cross_entropy(case.x, case.target, reduction="none", **opts).shape
    want_jac = [
        ref.grad(
            lambda v, i=i: ref.cross_entropy(case.x, case.target, weight=v, reduction="none", **opts)[i], case.weight
        )
        for i in np.ndindex(rows)
    ]
    assert_close(tb, jac, np.reshape(want_jac, (*rows, -1)))
    ws = torch.stack([w, 2 * w, w.flip(0)])
    batched = torch.func.vmap(torch.func.grad(lambda v: multixent.cross_entropy(x, t, weight=v, **kw)))(ws)
    for i in range(3):
        w_i = tb.to_numpy(ws[i])
        assert_close(tb, batched[i], ref.grad(lambda v: ref.cross_entropy(case.x, case.target, weight=v, **opts), w_i))


@pytest.mark.parametrize("kind", KINDS)
def test_jax_forward_mode_weight(jax_backend, kind):
    """``jax.jvp``/``jacfwd`` with respect to the class weights (the custom_jvp's ``ẇ``)."""
    jax = jax_backend.modules["jax"]
    import jax.numpy as jnp

    case = _case("all", kind, "kdim-axis1", seed=8)
    x, t, kw = case.on(jax_backend)
    w = kw.pop("weight")
    got = jax.jacfwd(lambda v: multixent.cross_entropy(x, t, weight=v, reduction="none", **kw))(w)
    want = jax.jacfwd(lambda v: ref.cross_entropy(x, t, weight=v, reduction="none", xp=jnp, **kw))(w)
    assert_close(jax_backend, got, np.asarray(want))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("option", ["plain", "weight", "ignore", "all"])
@pytest.mark.parametrize("shape", [(4, 3), (64, 10)], ids=str)
def test_compiled_grad_matches_native(torch_backend, shape, option, reduction):
    """``torch.compile`` (Inductor) of ``torch.func.grad`` of the loss, against the native loss's gradient run
    eagerly. Inductor compiles that derivative as an inference graph, where for some graphs (5 of these 16
    with a gather of the target's logit) the gather's derivative came out without the target's term (an
    error of 1/N): the target's logit is then a one-hot select (``_adapters.torch._compiled_transform``)."""
    tb = torch_backend
    torch = tb.modules["torch"]
    n, c = shape
    spec = OPTIONS[option]
    rng = np.random.default_rng(n)
    x = tb.asarray(rng.normal(size=shape) * 2, "float32")
    target = rng.integers(0, c, size=n)
    if spec.get("ignore"):
        target[::3] = -100
    t = tb.asarray(target)
    kw = {k: v for k, v in spec.items() if k not in ("weight", "ignore")}
    if spec.get("weight"):
        kw["weight"] = tb.asarray(rng.uniform(0.2, 2.0, size=c), "float32")

    def scalar(loss):
        return lambda z: loss(z, t, reduction=reduction, **kw)

    torch._dynamo.reset()
    got = torch.compile(torch.func.grad(scalar(multixent.cross_entropy)), fullgraph=True)(x)
    want = torch.func.grad(scalar(tb.native.cross_entropy))(x)
    assert_close(tb, got, tb.to_numpy(want), "float32")
