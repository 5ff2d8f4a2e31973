"""The fused torch route (the loss and its gradient in one pass, torch's "mean"/"sum") keeps autograd's
contract: against ``F.cross_entropy`` on an identical graph, with hooks (out of place and in place, on the
leaf and on an intermediate), a retained graph and a second backward, ``create_graph=True`` and a double
backward, in-place changes before the backward, and an optimizer step between two backwards; under
saved-tensor hooks, ``torch.utils.checkpoint`` and ``save_on_cpu``; and the graph holds the logits no longer
than ``F.cross_entropy``'s does.

Where the gradient is recomputed (a second backward, ``create_graph=True``) after an in-place change of
the tensor given to the loss, multixent raises torch's own "modified by an inplace operation" error, as
any function that saves its input does (``F.cross_entropy`` saves its log-softmax output instead and
differentiates at the forward point); elsewhere the values, the ``.grad`` and every hook's call count
equal torch's.
"""

from __future__ import annotations

import gc
import itertools
import weakref
from collections import Counter
from typing import Any

import numpy as np
import pytest

import multixent

N, C = 6, 5
INPLACE = "modified by an inplace operation"

#: (reduction, options): every option the fused route takes, alone and together
OPTIONS = {
    "mean": ("mean", {}),
    "sum-weight": ("sum", {"weight": True}),
    "mean-smoothing": ("mean", {"label_smoothing": 0.2}),
    "sum-ignore": ("sum", {"ignore": True}),
    "mean-all": ("mean", {"weight": True, "label_smoothing": 0.1, "ignore": True}),
}
#: hook on the leaf ``x`` or on ``h = x * 1.0``: none, out of place (``g * 2``), in place (``g.mul_(2)``)
HOOKS = ("none", "x-out", "x-in", "h-out", "h-in")
#: the backward calls made after the forward
SCENARIOS = ("once", "retain", "create", "create-then-once", "retain-then-create", "sgd")
#: the loss's input (the leaf, or the intermediate) and the in-place change made after the forward
CHANGES = (
    ("x", "none"),
    ("x", "x"),
    ("x", "x.data"),
    ("h", "none"),
    ("h", "h"),
    ("h", "x"),
    ("h", "x.data"),
)
RECOMPUTED = {"retain", "create", "create-then-once", "retain-then-create", "sgd"}


@pytest.fixture(scope="module")
def torch(torch_backend: Any) -> Any:
    return torch_backend.modules["torch"]


def _inputs(torch: Any, option: str) -> tuple[Any, Any, dict[str, Any]]:
    rng = np.random.default_rng(23)
    x = torch.tensor(rng.normal(size=(N, C)) * 2)
    y = rng.integers(0, C, size=N)
    reduction, spec = OPTIONS[option]
    kwargs: dict[str, Any] = {"reduction": reduction}
    if spec.get("ignore"):
        y[[1, 4]] = -100
    if spec.get("weight"):
        kwargs["weight"] = torch.tensor(rng.uniform(0.5, 2.0, size=C))
    if "label_smoothing" in spec:
        kwargs["label_smoothing"] = spec["label_smoothing"]
    return x, torch.tensor(y), kwargs


def _run(torch: Any, loss_fn: Any, option: str, hook: str, scenario: str, on: str, change: str) -> dict[str, Any]:
    """The outcome of one construction: the loss, the gradients and ``.grad`` values, every hook's call
    count, or the error (type and first line)."""
    x0, y, kwargs = _inputs(torch, option)
    x = x0.clone().requires_grad_()
    calls: Counter[str] = Counter()

    def counting(name: str) -> Any:
        def count(g: Any) -> None:
            calls[name] += 1

        return count

    def doubling(name: str, in_place: bool) -> Any:
        def double(g: Any) -> Any:
            calls[name + "-doubling"] += 1
            return g.mul_(2) if in_place else g * 2

        return double

    x.register_hook(counting("x"))
    h = x * 1.0 if on == "h" else x
    if on == "h":
        h.register_hook(counting("h"))
    if hook != "none":
        where, how = hook.split("-")
        (x if where == "x" else h).register_hook(doubling(where, how == "in"))
    out: dict[str, Any] = {}
    try:
        loss = loss_fn(h, y, **kwargs)
        out["loss"] = loss.detach().clone()
        with torch.no_grad():
            if change == "h":
                h.mul_(3)
            elif change == "x":
                x.mul_(3)
        if change == "x.data":
            x.data.mul_(3)
        v = torch.tensor(np.random.default_rng(5).normal(size=(N, C)))
        if scenario == "once":
            loss.backward()
        elif scenario == "retain":
            loss.backward(retain_graph=True)
            out["grad-1"] = x.grad.clone()
            loss.backward()
        elif scenario in ("create", "retain-then-create"):
            if scenario == "retain-then-create":
                loss.backward(retain_graph=True)
            (g,) = torch.autograd.grad(loss, x, create_graph=True)
            out["g"] = g.detach().clone()
            (gg,) = torch.autograd.grad((g * v).sum() + (g * g).sum(), x)
            out["gg"] = gg
        elif scenario == "create-then-once":
            (g,) = torch.autograd.grad(loss, x, create_graph=True)
            out["g"] = g.detach().clone()
            loss.backward()
        elif scenario == "sgd":
            opt = torch.optim.SGD([x], lr=0.5)
            loss.backward(retain_graph=True)
            out["grad-1"] = x.grad.clone()
            opt.step()
            loss.backward()
            out["x"] = x.detach().clone()
        out["grad"] = None if x.grad is None else x.grad.detach().clone()
    except RuntimeError as err:
        out["error"] = (type(err), str(err).split("\n")[0])
    out["calls"] = dict(calls)
    return out


def _reason(scenario: str, on: str, change: str) -> str | None:
    """Why multixent raises where torch does not: a recompute at a tensor given to the loss that changed
    in place since the forward (the optimizer's step changes the leaf)."""
    if scenario not in RECOMPUTED:
        return None
    changed = change == on or (scenario == "sgd" and on == "x")
    return "the saved logits changed in place" if changed else None


def _assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["calls"] == want["calls"]
    assert ("error" in got) == ("error" in want), (got.get("error"), want.get("error"))
    assert got.keys() == want.keys()
    for key, value in want.items():
        if key == "calls":
            continue
        if key == "error":
            assert got[key] == value
        elif value is None:
            assert got[key] is None, key
        else:
            np.testing.assert_allclose(got[key].numpy(), value.numpy(), rtol=1e-10, atol=1e-13, err_msg=key)


def _cases() -> list[Any]:
    """Every combination, but hooks on an intermediate the loss does not take, and a recompute after an
    untracked ``x.data`` change of the logits themselves (autograd cannot see it: the recompute runs at
    the new values, as any function that saves its input does; ``F.cross_entropy`` at the forward's)."""
    cases = []
    for option, hook, scenario, (on, change) in itertools.product(OPTIONS, HOOKS, SCENARIOS, CHANGES):
        if hook.startswith("h") and on == "x":
            continue
        if change == "x.data" and on == "x" and scenario in RECOMPUTED - {"sgd"}:
            continue
        case_id = f"{option}-hook-{hook}-{scenario}-loss-of-{on}-change-{change}"
        cases.append(pytest.param(option, hook, scenario, on, change, id=case_id))
    return cases


@pytest.mark.parametrize(("option", "hook", "scenario", "on", "change"), _cases())
def test_fused_route_matches_torch(torch: Any, option: str, hook: str, scenario: str, on: str, change: str) -> None:
    want = _run(torch, torch.nn.functional.cross_entropy, option, hook, scenario, on, change)
    got = _run(torch, multixent.cross_entropy, option, hook, scenario, on, change)
    reason = _reason(scenario, on, change)
    if reason is None or "error" in want:
        _assert_same(got, want)
        return
    # torch's own error for a saved tensor changed in place; what ran before it as torch's
    assert got["error"][0] is RuntimeError and INPLACE in got["error"][1], got.get("error")
    assert got["error"][1].startswith("one of the variables needed for gradient computation")
    before = {k: v for k, v in want.items() if k in got and k not in ("calls", "error")}
    _assert_same({**{k: got[k] for k in before}, "calls": {}}, {**before, "calls": {}})
    for name, count in got["calls"].items():
        assert count <= want["calls"].get(name, 0), (name, got["calls"], want["calls"])


def test_fused_route_is_taken(torch: Any) -> None:
    """The constructions above run through the fused route (else they would test the ordinary one)."""
    for option in OPTIONS:
        x, y, kwargs = _inputs(torch, option)
        loss = multixent.cross_entropy(x.requires_grad_(), y, **kwargs)
        assert type(loss.grad_fn).__name__ == "_FusedBackward", option


def test_second_backward_without_retained_graph_raises(torch: Any) -> None:
    """Torch's own error for a second backward through a freed graph (the saved logits are freed)."""
    for fn in (torch.nn.functional.cross_entropy, multixent.cross_entropy):
        x, y, _ = _inputs(torch, "mean")
        loss = fn(x.requires_grad_(), y)
        loss.backward()
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            loss.backward()


def test_saved_logits_are_the_input(torch: Any) -> None:
    """The logits are saved as they are (no copy), and the usual backward (upstream 1) hands the gradient
    computed in the forward to ``.grad``: one logits-sized allocation in the backward, none more."""
    x, y, _ = _inputs(torch, "mean-all")
    x.requires_grad_()
    loss = multixent.cross_entropy(x, y)
    (gradient,) = loss.grad_fn.saved_tensors
    (saved,) = loss.grad_fn.next_functions[0][0].saved_tensors
    assert saved.data_ptr() == x.data_ptr()
    loss.backward()
    assert x.grad.data_ptr() == gradient.data_ptr()
    g = x.grad
    x.grad = None
    loss = multixent.cross_entropy(x, y)
    loss.backward()
    np.testing.assert_array_equal(x.grad.numpy(), g.numpy())


def test_saved_tensor_hooks_see_the_logits_and_the_gradient(torch: Any) -> None:
    """What the fused route keeps for its backward goes through the saved-tensor hooks, as the ordinary
    route's saved tensors do: the logits, as they are, and the gradient computed in the forward (so that
    offloading and checkpointing apply to them); the backward reads them through the hooks."""
    x, y, kwargs = _inputs(torch, "mean-all")
    x.requires_grad_()
    packed: list[Any] = []
    unpacked: list[int] = []

    def pack(t: Any) -> int:
        packed.append(t.detach().clone())
        return len(packed) - 1

    def unpack(i: int) -> Any:
        unpacked.append(i)
        return packed[i]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss = multixent.cross_entropy(x, y, **kwargs)
    (want,) = torch.autograd.grad(torch.nn.functional.cross_entropy(x, y, **kwargs), x)
    logits_sized = [t for t in packed if t.shape == x.shape]
    assert len(packed) == len(logits_sized) == 2
    np.testing.assert_array_equal(logits_sized[0].numpy(), x.detach().numpy())
    np.testing.assert_allclose(logits_sized[1].numpy(), want.numpy(), rtol=1e-12, atol=1e-15)
    loss.backward()
    assert unpacked == [1]  # the first backward reads the gradient alone
    np.testing.assert_allclose(x.grad.numpy(), want.numpy(), rtol=1e-12, atol=1e-15)


def test_logits_freed_after_the_backward(torch: Any) -> None:
    """As for ``F.cross_entropy``, the graph, which lives as long as the loss does (in a training loop, into
    the next step's forward), holds the logits no longer than until the backward has run."""
    for loss_fn in (torch.nn.functional.cross_entropy, multixent.cross_entropy):
        x, y, kwargs = _inputs(torch, "mean-all")
        logits = x.requires_grad_() * 2.0
        alive = weakref.ref(logits)
        loss = loss_fn(logits, y, **kwargs)
        del logits
        loss.backward()
        gc.collect()
        assert alive() is None, loss_fn


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("wrapper", ["checkpoint", "checkpoint-reentrant", "save_on_cpu"])
def test_checkpointed_and_offloaded_equal_torch(torch: Any, option: str, wrapper: str) -> None:
    """Under ``torch.utils.checkpoint`` (both kinds) and ``save_on_cpu``, the loss, ``.grad`` and a hook's
    calls equal ``F.cross_entropy``'s."""
    from torch.utils.checkpoint import checkpoint

    def run(loss_fn: Any) -> tuple[Any, Any, int]:
        x0, y, kwargs = _inputs(torch, option)
        x = x0.clone().requires_grad_()
        calls = []
        x.register_hook(calls.append)
        h = x * 1.5
        if wrapper == "save_on_cpu":
            with torch.autograd.graph.save_on_cpu():
                loss = loss_fn(h, y, **kwargs)
        else:
            reentrant = wrapper == "checkpoint-reentrant"
            loss = checkpoint(lambda a: loss_fn(a, y, **kwargs), h, use_reentrant=reentrant)
        (loss * 2).backward()
        return loss.detach(), x.grad, len(calls)

    want, got = run(torch.nn.functional.cross_entropy), run(multixent.cross_entropy)
    np.testing.assert_allclose(got[0].numpy(), want[0].numpy(), rtol=1e-12)
    np.testing.assert_allclose(got[1].numpy(), want[1].numpy(), rtol=1e-10, atol=1e-13)
    assert got[2] == want[2] == 1
