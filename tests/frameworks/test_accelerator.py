"""The accelerator strategy: one block of rows, no host read, the class indices asserted on the device.

On the CPU its private switch (``multixent._compat.ACCELERATOR_ON_CPU``) runs it on CPU tensors: its
operations are counted under a ``TorchDispatchMode`` (``benchmarks/passes.py``). The CUDA and CuPy
tests run where such a device is present and skip with a reason elsewhere.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from _paths import load_script
from conftest import SELECTED

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif("torch" not in SELECTED, reason="torch backend not selected")

import torch.nn.functional as F  # noqa: E402

import multixent as mx  # noqa: E402
from multixent import _compat  # noqa: E402

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device here")


def _passes():
    """``benchmarks/passes.py`` (the operation counter the benchmark reports with)."""
    return load_script("benchmarks/passes.py", "multixent_bench_passes")


@pytest.fixture
def accelerator(monkeypatch):
    """The strategy forced on CPU tensors, with the index check on the device (no host read)."""
    monkeypatch.setattr(_compat, "ACCELERATOR_ON_CPU", True)
    monkeypatch.setattr(_compat, "SYNC_CHECKS", False)


@pytest.mark.parametrize(
    ("options", "most_launches", "most_logits_ops"),
    [({}, 31, 9), ({"label_smoothing": 0.1}, 40, 11)],
    ids=["mean", "smoothing"],
)
def test_counted_forward_and_backward_at_4096_by_32000(accelerator, options, most_launches, most_logits_ops):
    """No loop over row blocks, no host read during the call, each operation touching the logits' size at
    most once (one read and one write), and at most ``most_launches`` device launches (the operations less
    the Python numbers ``torch.where`` wraps on the host) of which ``most_logits_ops`` touch the logits'
    size: ``benchmarks/passes.py`` reports them beside ``F.cross_entropy``'s."""
    n, c = 4096, 32000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=g).requires_grad_()
    y = torch.randint(0, c, (n,), generator=g)
    y[::7] = -100

    def step():
        x.grad = None
        mx.cross_entropy(x, y, **options).backward()

    counted = _passes().count(step)
    names = counted["op_names"]
    assert counted["host_reads"] == 0, names
    assert counted["launches"] <= most_launches, names
    assert counted["logits_ops"] <= most_logits_ops, names
    assert counted["max_logits_touches"] <= 2, names  # one read and one write at most
    x_ref = x.detach().clone().requires_grad_()
    F.cross_entropy(x_ref, y, **options).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    "options",
    [{}, {"reduction": "sum", "label_smoothing": 0.2}, {"reduction": "none"}, {"weight": True, "z_loss": 1e-3}],
    ids=["mean", "sum-smoothing", "none", "weight-z-loss"],
)
def test_values_and_gradients(accelerator, options):
    """Against ``F.cross_entropy`` in float64 (the z-loss added to its rows)."""
    _check_against_native(options)


def _check_against_native(options):
    """multixent's loss and gradient against ``F.cross_entropy``'s in float64 (the z-loss added to its rows)."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(33, 17, generator=g, dtype=torch.float64) * 4).requires_grad_()
    y = torch.randint(0, 17, (33,), generator=g)
    y[5] = -100
    kw = dict(options)
    z = kw.pop("z_loss", 0.0)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(17, generator=g, dtype=torch.float64) + 0.5
    loss = mx.cross_entropy(x, y, z_loss=z, **kw)
    x_ref = x.detach().clone().requires_grad_()
    ref = F.cross_entropy(x_ref, y, **kw)
    if z:
        lse = torch.logsumexp(x_ref, -1)[y != -100]
        ref = ref + z * (lse * lse).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    upstream = torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5
    torch.testing.assert_close(*(torch.autograd.grad((upstream * a).sum(), b)[0] for a, b in ((loss, x), (ref, x_ref))))


@pytest.fixture
def compiled_strategy(accelerator, monkeypatch):
    """The strategy with its loss-and-gradient pass compiled (``COMPILED_STRATEGY``), on CPU tensors; dynamo's
    caches emptied first (other tests' kinds of call count towards its recompile limit)."""
    monkeypatch.setattr(_compat, "COMPILED_STRATEGY", True)
    torch._dynamo.reset()


def _compiled_regions(fn):
    """How many times ``fn()`` runs a ``torch.compile``'d region (torch's profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name.startswith("Torch-Compiled Region") for e in prof.events())


@pytest.mark.parametrize(
    "options",
    [{}, {"reduction": "sum", "label_smoothing": 0.2}, {"weight": True, "z_loss": 1e-3}],
    ids=["mean", "sum-smoothing", "weight-z-loss"],
)
def test_compiled_strategy_values_and_gradients(compiled_strategy, options):
    """The compiled pass (one compiled region per call) against ``F.cross_entropy`` in float64."""
    assert _compiled_regions(lambda: _check_against_native(options)) == 1


def test_compiled_strategy_compiles_once_for_every_shape(compiled_strategy):
    """``dynamic=True``: after a first call, other shapes of the same kind of call compile nothing new; each
    equals ``F.cross_entropy`` (float32, every 7th row ignored, softcap's tanh on both sides)."""
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(5)
    for i, (n, c) in enumerate([(8, 5), (33, 17), (100, 50), (64, 1000)]):
        x = torch.randn(n, c, generator=g).mul_(3).requires_grad_()
        y = torch.randint(0, c, (n,), generator=g)
        y[::7] = -100
        loss = mx.cross_entropy(x, y, softcap=4.0)
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
        loss.backward()
        x_ref = x.detach().clone().requires_grad_()
        F.cross_entropy(4.0 * torch.tanh(x_ref / 4.0), y).backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-7)
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_strategy_asserts_on_the_device(compiled_strategy):
    """The compiled pass keeps the device-side index check (``torch._assert_async`` in the graph); the user's
    own ``torch.compile`` of the call still gives the traced answer, NaN."""
    x, y = torch.randn(4, 3, requires_grad=True), torch.tensor([0, 1, 3, -100])
    with pytest.raises(RuntimeError, match="outside \\[0, C\\)"):
        mx.cross_entropy(x, y, label_smoothing=0.05)
    assert torch.compile(mx.cross_entropy, backend="eager")(x, y, label_smoothing=0.05).isnan()


@pytest.mark.parametrize("function", ["cross_entropy", "linear"])
def test_compiled_strategy_is_nan_where_its_assertion_is_dropped(compiled_strategy, monkeypatch, function):
    """Compiled, the index check is Inductor's assertion, which a GPU build drops when Inductor's
    ``assert_indirect_indexing`` is off: the out-of-range row's loss is NaN too, so the loss is NaN, never a
    number from the clipped index (here the assertion made a no-op)."""
    monkeypatch.setattr(torch, "_assert_async", lambda *args, **kwargs: None)
    g = torch.Generator().manual_seed(7)
    h, w = torch.randn(4, 2, generator=g, requires_grad=True), torch.randn(3, 2, generator=g)
    y = torch.tensor([0, 1, 3, -100])
    loss = mx.linear_cross_entropy(h, w, y) if function == "linear" else mx.cross_entropy(h @ w.T, y)
    loss.backward()
    assert loss.isnan()


@pytest.mark.parametrize("strategy", ["eager", "compiled"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_linear_products_in_bfloat16(accelerator, device, strategy, monkeypatch):
    """``linear_cross_entropy`` under bfloat16 autocast (float32 leaves), 16 chunks: the products take bfloat16
    operands (on CUDA tensor cores, ``out_dtype``; on the CPU the operands cast, the same products) and
    the logits accumulate in float32, so the float32 loss is the float64 loss of the bfloat16-rounded
    inputs to float32 precision (bfloat16 logits would be ~1e-3 off); the gradients, whose products take
    the logits' gradient rounded to bfloat16, equal the float64 ones to bfloat16's rounding. With each chunk's
    pass eager, and compiled (``COMPILED_STRATEGY``)."""
    monkeypatch.setattr(_compat, "COMPILED_STRATEGY", strategy == "compiled")
    g = torch.Generator().manual_seed(6)
    n, d, v = 64, 32, 300
    leaves = {"h": torch.randn(n, d, generator=g), "w": torch.randn(v, d, generator=g) / 4}
    y = torch.randint(0, v, (n,), generator=g)
    y[::5] = -100
    h, w = (leaves[k].to(device, copy=True).requires_grad_() for k in ("h", "w"))
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = mx.linear_cross_entropy(h, w, y.to(device), chunk_size=4, label_smoothing=0.1)
    loss.backward()
    h64, w64 = (leaves[k].bfloat16().double().requires_grad_() for k in ("h", "w"))
    ref = F.cross_entropy(h64 @ w64.T, y, label_smoothing=0.1)
    ref.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=1e-5, atol=0)
    eps = torch.finfo(torch.bfloat16).eps
    for got, want in ((h.grad, h64.grad), (w.grad, w64.grad)):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double().cpu(), want, rtol=16 * eps, atol=16 * eps * scale)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_linear_classifier_gradient_as_accurate_as_the_naive_path(accelerator, device):
    """bfloat16 leaves, products in bfloat16: ``W̄`` accumulates over the chunks in float32 and is rounded once,
    so its error against float64 does not grow with the number of chunks (in bfloat16, one rounding per
    chunk: about 7x the naive path's error in 64 chunks here) and stays within the naive path's
    (``F.linear`` + ``F.cross_entropy`` in bfloat16, one product for ``W̄``)."""
    g = torch.Generator().manual_seed(8)
    n, d, v = 1024, 64, 2048
    h0, w0 = torch.randn(n, d, generator=g).bfloat16(), (torch.randn(v, d, generator=g) / 8).bfloat16()
    y = torch.randint(0, v, (n,), generator=g)
    h64, w64 = h0.double().requires_grad_(), w0.double().requires_grad_()
    F.cross_entropy(h64 @ w64.T, y).backward()

    def w_bar_error(loss_of):
        h, w = (a.to(device, copy=True).requires_grad_() for a in (h0, w0))
        loss_of(h, w, y.to(device)).backward()
        return ((w.grad.double().cpu() - w64.grad).abs().max() / w64.grad.abs().max()).item()

    naive = w_bar_error(lambda h, w, t: F.cross_entropy(F.linear(h, w), t))
    for chunks in (1, 64):
        error = w_bar_error(lambda h, w, t, k=chunks: mx.linear_cross_entropy(h, w, t, chunk_size=n // k))
        assert error <= 1.25 * naive, (chunks, error, naive)


@pytest.mark.parametrize("addmm_into_wider", [True, False])
def test_classifier_gradient_sum_on_an_accelerator(monkeypatch, addmm_into_wider):
    """On an accelerator ``W̄ += ḡᵀ h_c`` adds bfloat16 operands' product into the float32 ``W̄`` in place, by
    ``addmm``'s ``out_dtype``, or ``mm``'s then added where this torch's ``addmm`` refuses the wider input
    (shapes, dtypes and aliasing on meta tensors here; the values on CUDA in the accuracy test above)."""
    from multixent._adapters import torch as adapter

    if addmm_into_wider and not adapter._addmm_into_wider("meta"):  # torch 2.11's meta addmm: out_dtype as beta
        pytest.skip("this torch's addmm refuses a float32 input beside bfloat16 operands (the probe answers False)")
    monkeypatch.setattr(adapter, "_addmm_into_wider", lambda device_type: addmm_into_wider)
    acc = torch.zeros(5, 3, device="meta")
    a, b = (torch.empty(shape, dtype=torch.bfloat16, device="meta") for shape in ((5, 2), (2, 3)))
    out = adapter._matmul_add(acc, a, b)
    assert out is acc and out.dtype == torch.float32 and out.shape == (5, 3)


def test_compiled_strategy_linear_chunks(compiled_strategy):
    """``linear_cross_entropy`` with its chunks' pass compiled: one graph for every chunk shape and number of
    rows (float32, class weights, ignored rows, a bias: against ``F.cross_entropy`` of ``F.linear`` in
    float64), and the class indices asserted in the graph."""
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(8)
    d, v = 16, 70
    w, b, weight = torch.randn(v, d, generator=g) / 4, torch.randn(v, generator=g), torch.rand(v, generator=g)
    for i, (n, chunk) in enumerate([(24, 8), (37, 10), (51, 7)]):  # chunks of 2 rows or more (1: a graph of its own)
        h = torch.randn(n, d, generator=g, requires_grad=True)
        y = torch.randint(0, v, (n,), generator=g)
        y[::6] = -100
        loss = mx.linear_cross_entropy(h, w, y, bias=b, weight=weight, chunk_size=chunk, label_smoothing=0.1)
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
        loss.backward()
        h64 = h.detach().double().requires_grad_()
        ref = F.cross_entropy(F.linear(h64, w.double(), b.double()), y, weight=weight.double(), label_smoothing=0.1)
        ref.backward()
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
        torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-7)
    assert counters["stats"]["unique_graphs"] == graphs
    y[0] = v
    with pytest.raises(RuntimeError, match="outside \\[0, C\\)"):
        mx.linear_cross_entropy(h, w, y, chunk_size=7).backward()


def test_linear_gradients_scaled_in_place_keep_the_autograd_contract(accelerator):
    """On accelerators ``linear_cross_entropy``'s gradients are scaled by the upstream in place (no host read):
    a retained graph's second backward recomputes them (the same values, for another upstream too), and an
    in-place change of an input before it raises torch's own error."""
    g = torch.Generator().manual_seed(7)
    h = torch.randn(12, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 30, (12,), generator=g)
    loss = mx.linear_cross_entropy(h, w, y, chunk_size=5)
    (0.5 * loss).backward(retain_graph=True)
    first = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    (2.0 * loss).backward(retain_graph=True)
    for a, b in zip(first, (h.grad, w.grad), strict=True):
        torch.testing.assert_close(4 * a, b, rtol=1e-14, atol=0)
    with torch.no_grad():
        w.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("loss", ["cross_entropy", "linear_cross_entropy"])
def test_batched_upstream_gradients(accelerator, loss):
    """The gradients scaled in place by the upstream take a batched upstream too (``is_grads_batched``, as
    ``gradcheck(check_batched_grad=True)`` does): out of place there, equal to ``F.cross_entropy``'s."""
    g = torch.Generator().manual_seed(8)
    h = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 6, -100, 3])
    upstream = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)
    ours = mx.cross_entropy(h @ w.T, y) if loss == "cross_entropy" else mx.linear_cross_entropy(h, w, y)
    ref = F.cross_entropy(h @ w.T, y)
    got, want = (torch.autograd.grad(a, h, upstream, is_grads_batched=True)[0] for a in (ours, ref))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_out_of_range_index_asserts_on_the_device(accelerator, monkeypatch):
    """``torch._assert_async`` (on the CPU it raises at once; on a GPU, a device-side assertion as for
    ``F.cross_entropy``); ``SYNC_CHECKS`` gives the IndexError naming the index."""
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 3, -100])
    with pytest.raises(RuntimeError, match="outside \\[0, C\\)"):
        mx.cross_entropy(x, y)
    with pytest.raises(RuntimeError, match="outside \\[0, C\\)"):
        mx.linear_cross_entropy(torch.randn(4, 2), torch.randn(3, 2), y)
    monkeypatch.setattr(_compat, "SYNC_CHECKS", True)
    with pytest.raises(IndexError, match="class index 3"):
        mx.cross_entropy(x, y)


_ROUTES = {
    "no autograd": lambda x, y, w: mx.cross_entropy(x.detach(), y),
    "loss and gradient in one pass": lambda x, y, w: mx.cross_entropy(x, y).backward(),
    "autograd of the rows": lambda x, y, w: mx.cross_entropy(x, y, weight=w).backward(),
    "per row": lambda x, y, w: mx.cross_entropy(x, y, reduction="none").sum().backward(),
    "double backward": lambda x, y, w: torch.autograd.grad(
        torch.autograd.grad(mx.cross_entropy(x, y), x, create_graph=True)[0].sum(), x
    ),
    "forward mode": lambda x, y, w: torch.func.jvp(lambda a: mx.cross_entropy(a, y), (x.detach(),), (x.detach(),)),
    "torch.func.grad": lambda x, y, w: torch.func.grad(lambda a: mx.cross_entropy(a, y))(x.detach()),
    "cross_entropy_and_grad": lambda x, y, w: mx.cross_entropy_and_grad(x.detach(), y),
    "nll_loss": lambda x, y, w: mx.nll_loss(torch.log_softmax(x, -1), y),
}


@pytest.mark.parametrize("route", list(_ROUTES))
def test_every_eager_route_asserts_on_the_device(accelerator, route):
    """Each eager way through torch (the adapter's routes, a transform with the arrays captured) asserts the
    class indices on the device, and runs where none is out of range (the values of those routes under the
    strategy: ``nox -s accelerator``'s suite)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64).requires_grad_()
    w = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    with pytest.raises(RuntimeError, match="outside \\[0, C\\)"):
        _ROUTES[route](x, torch.tensor([0, 1, 4, -100, 2, 3]), w)
    _ROUTES[route](x, torch.tensor([0, 1, 3, -100, 2, 3]), w)


def test_batched_targets_out_of_range_are_nan(accelerator):
    """Under ``torch.func.vmap`` over the targets their values cannot be asserted: the out-of-range row's
    loss is NaN (the traced path's answer), the others equal ``F.cross_entropy``'s."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([[0, 1, 3, -100], [0, 1, 2, -100]])
    out = torch.func.vmap(lambda a, t: mx.cross_entropy(a, t, reduction="none"))(x, y)
    assert torch.isnan(out[0, 2])
    keep = torch.ones_like(out, dtype=torch.bool)
    keep[0, 2] = False
    ref = torch.stack([F.cross_entropy(x[i], y[i].clamp(max=2), reduction="none") for i in range(2)])
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-12, atol=1e-12)


def test_cpu_tensors_take_the_cpu_route(monkeypatch):
    """Without the switch, CPU tensors read their class indices on the host (an IndexError, at once)."""
    monkeypatch.setattr(_compat, "ACCELERATOR_ON_CPU", False)
    with pytest.raises(IndexError, match="class index 3"):
        mx.cross_entropy(torch.randn(4, 3), torch.tensor([0, 1, 3, -100]))


@needs_cuda
@pytest.mark.parametrize(
    ("options", "strategy"),
    [
        ("smoothing", "eager"),
        ("weight", "eager"),
        ("linear", "eager"),
        ("smoothing", "compiled"),
        ("weight", "compiled"),
    ],
)
def test_cuda_values_without_host_synchronisation(options, strategy, monkeypatch):
    """A CUDA call makes no host synchronisation (``torch.cuda.set_sync_debug_mode("error")``) and
    equals ``F.cross_entropy`` in float64 on the CPU (of ``F.linear``'s logits for ``linear_cross_entropy``);
    with the strategy eager, and compiled (``COMPILED_STRATEGY``)."""
    monkeypatch.setattr(_compat, "COMPILED_STRATEGY", strategy == "compiled")
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(64, 32, generator=g), torch.randn(1000, 32, generator=g) / 8
    x = F.linear(h, w) if options != "linear" else h
    y = torch.randint(0, 1000, (64,), generator=g)
    y[3] = -100
    kw = {"label_smoothing": 0.1} if options == "smoothing" else {}
    if options == "weight":
        kw["weight"] = torch.rand(1000, generator=g) + 0.5
    xc, wc = x.cuda().requires_grad_(), w.cuda()
    yc, kwc = y.cuda(), {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}

    def loss_of(a):
        return mx.linear_cross_entropy(a, wc, yc) if options == "linear" else mx.cross_entropy(a, yc, **kwc)

    loss_of(xc).backward()  # warm
    xc.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = loss_of(xc)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    x64 = x.double().requires_grad_()
    logits64 = F.linear(x64, w.double()) if options == "linear" else x64
    ref = F.cross_entropy(logits64, y, **{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    ref.backward()
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xc.grad.double().cpu(), x64.grad, rtol=1e-4, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("strategy", ["eager", "compiled"])
def test_cuda_graph_capture_of_a_training_step(strategy, monkeypatch):
    """A linear model's step (forward, multixent's loss, backward, SGD) captured in a CUDA graph and
    replayed gives the eager step's parameters; with the strategy eager, and compiled (``COMPILED_STRATEGY``,
    compiled during the warm-up)."""
    monkeypatch.setattr(_compat, "COMPILED_STRATEGY", strategy == "compiled")
    g = torch.Generator().manual_seed(3)
    inputs = torch.randn(32, 16, generator=g).cuda()
    target = torch.randint(0, 10, (32,), generator=g).cuda()
    models = [torch.nn.Linear(16, 10).cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]

    def step(model, opt):
        opt.zero_grad(set_to_none=False)
        loss = mx.cross_entropy(model(inputs), target, label_smoothing=0.1)
        loss.backward()
        opt.step()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up on a side stream, as torch's docs ask
            step(models[1], opts[1])
            step(models[0], opts[0])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(models[1], opts[1])
    for _ in range(4):
        graph.replay()
        step(models[0], opts[0])
    torch.cuda.synchronize()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


#: One call in a fresh process (a CUDA device-side assertion leaves the process's CUDA context unusable):
#: argv = device, "eager" or "compiled" (``COMPILED_STRATEGY``), "cross_entropy" or "linear", the third row's
#: class index (of 3 classes); prints "done" once the device has finished the forward and backward.
_ONE_CALL = """
import sys
import torch
import multixent as mx
from multixent import _compat
device, strategy, function, index = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
_compat.COMPILED_STRATEGY = strategy == "compiled"
g = torch.Generator().manual_seed(0)
h = torch.randn(4, 2, generator=g).to(device).requires_grad_()
w = torch.randn(3, 2, generator=g).to(device)
y = torch.tensor([0, 1, index, -100], device=device)
loss = mx.linear_cross_entropy(h, w, y) if function == "linear" else mx.cross_entropy(h @ w.T, y)
loss.backward()
if device == "cuda":
    torch.cuda.synchronize()
print("done")
"""


@pytest.mark.parametrize(
    ("device", "strategies"),
    [("cpu", ["eager"]), pytest.param("cuda", ["eager", "compiled"], marks=needs_cuda)],
)
def test_cuda_out_of_range_index_fails_the_call(device, strategies):
    """A class index outside ``[0, C)`` fails the call, never a silently wrong loss: on CUDA a device-side
    assertion (as for ``F.cross_entropy``), with the strategy eager and compiled, for ``cross_entropy`` and
    ``linear_cross_entropy``; the same calls with the index in range finish. Each call runs in its own process,
    all at once; on the CPU (the strategy forced) the same harness sees the assertion's message."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MULTIXENT_ACCELERATOR_ON_CPU": "1", "MULTIXENT_SYNC_CHECKS": "0"}
    cases = [(s, f, i) for s in strategies for f in ("cross_entropy", "linear") for i in (2, 3)]
    runs = {
        case: subprocess.Popen(
            [sys.executable, "-c", _ONE_CALL, device, *map(str, case)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for case in cases
    }
    failed = "device-side assert" if device == "cuda" else "outside \\[0, C\\)"
    for (strategy, function, index), run in runs.items():
        out, err = run.communicate(timeout=240)
        case = f"{strategy} {function}, index {index}: exit {run.returncode}\n{err[-2000:]}"
        if index < 3:
            assert run.returncode == 0 and "done" in out, case
        else:
            assert run.returncode != 0 and "done" not in out, case
            assert re.search(failed, err), case


def test_cupy_values_and_gradient():
    """CuPy arrays through the generic adapter: values and ``cross_entropy_and_grad`` against NumPy float64."""
    cp = pytest.importorskip("cupy", reason="CuPy not installed")
    try:
        cp.cuda.runtime.getDeviceCount()
    except Exception as err:  # installed without a usable GPU
        pytest.skip(f"no CUDA device for CuPy: {err}")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((40, 9)) * 3
    y = rng.integers(0, 9, 40)
    y[2] = -100
    w = rng.random(9) + 0.5
    for kw in ({}, {"weight": w, "label_smoothing": 0.1}, {"reduction": "sum", "z_loss": 1e-3, "softcap": 5.0}):
        dev = {k: cp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
        loss, grad = mx.cross_entropy_and_grad(cp.asarray(x), cp.asarray(y), **dev)
        ref_loss, ref_grad = mx.cross_entropy_and_grad(x, y, **kw)
        assert isinstance(loss, cp.ndarray) and isinstance(grad, cp.ndarray)
        np.testing.assert_allclose(cp.asnumpy(loss), ref_loss, rtol=1e-12)
        np.testing.assert_allclose(cp.asnumpy(grad), ref_grad, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(
            cp.asnumpy(mx.cross_entropy(cp.asarray(x), cp.asarray(y), **dev)), ref_loss, rtol=1e-12
        )
