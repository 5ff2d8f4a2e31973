"""Count what one call does to memory: torch operations, the bytes of logits-sized tensors they read and
write, and host reads, under a ``TorchDispatchMode``.

``count(fn)`` runs ``fn()`` once and answers::

    {"ops": ..., "launches": ..., "logits_ops": ..., "max_logits_touches": ..., "bytes_per_logit": ...,
     "host_reads": ..., "op_names": [...]}

- ``ops``: the operations dispatched, views and other metadata-only ones (``view``, ``t``, ``detach``,
  ``expand``, ...) left out; ``op_names`` their names in order; ``launches``: those less
  ``aten.scalar_tensor``, the 0-d CPU tensor a Python number becomes in ``torch.where`` (on a GPU, a kernel
  argument: no launch);
- ``logits_ops``: those reading or writing a logits-sized tensor (``numel`` at least half the logits'; the
  logits' ``numel``, ``N·C``, is ``numel=`` or else the largest tensor seen); ``max_logits_touches``: the most
  logits-sized tensors one operation reads and writes (an in-place update of one: 2);
- ``bytes_per_logit``: over the operations, the bytes of the tensors each reads (its tensor arguments: an
  upper bound, as a kernel may read only an argument's shape) and writes (its outputs; a fresh ``empty``
  writes nothing), divided by ``N·C``: every tensor, so that blocks of rows count too (row- and class-sized
  ones add about ``1/C`` each). Eager operations cannot fuse, so
  this is the memory traffic of the eager route: reading float32 logits once and writing their gradient
  once is 8 bytes per logit;
- ``host_reads``: ``aten._local_scalar_dense``, ``aten.item``, ``aten.is_nonzero`` and the calls of
  ``Tensor.item``/``tolist``/``numpy`` during the call (each read once).

``python benchmarks/passes.py`` prints the table at 4096 × 32000 float32, forward+backward, for multixent's
accelerator strategy (forced on the CPU), its CPU strategy, and ``F.cross_entropy``.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_HOST = {"_local_scalar_dense", "item", "is_nonzero"}
_NO_WRITE = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [a for a in tree_flatten(tree)[0] if isinstance(a, torch.Tensor)]


def _metadata_only(func: Any) -> bool:
    """A view (``view``, ``t``, ``expand``, ``detach``, ...) or a shape query: no memory read or written."""
    name = func.overloadpacket.__name__
    return bool(getattr(func, "is_view", False)) or name in {"_unsafe_view", "sym_size", "sym_stride", "dim"}


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[int], list[int]]] = []  # (name, numel x itemsize read, ... written)
        self.host_reads = 0
        self.in_wrapper = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _HOST:
            self.host_reads += self.in_wrapper == 0
        elif not _metadata_only(func):
            out_kw = [kwargs[k] for k in kwargs if k == "out" or k.startswith("out")]
            out_ids = {id(t) for t in _tensors(out_kw)}
            reads = [t for t in _tensors((args, kwargs)) if id(t) not in out_ids]
            writes = [] if name in _NO_WRITE else _tensors(out)
            size = lambda ts: [(t.numel(), t.element_size()) for t in ts]  # noqa: E731
            self.calls.append((str(func.overloadpacket), size(reads), size(writes)))  # type: ignore[arg-type]
        return out


@contextlib.contextmanager
def _host_wrappers(counter: _Counter) -> Iterator[None]:
    """Count ``Tensor.item``/``tolist``/``numpy`` calls; the dispatches they cause are not counted again."""
    names = ("item", "tolist", "numpy")
    own = {name: vars(torch.Tensor)[name] for name in names if name in vars(torch.Tensor)}  # else TensorBase's

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if counter.in_wrapper == 0:
                counter.host_reads += 1
            counter.in_wrapper += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                counter.in_wrapper -= 1

        return counted

    try:
        for name in names:
            setattr(torch.Tensor, name, wrap(getattr(torch.Tensor, name)))
        yield
    finally:
        for name in names:
            if name in own:
                setattr(torch.Tensor, name, own[name])
            else:
                delattr(torch.Tensor, name)


def count(fn: Callable[[], Any], numel: int | None = None) -> dict[str, Any]:
    """Run ``fn()`` once under the counter: see the module's docstring. ``numel``: the logits' ``N·C``
    (default: the largest tensor any operation touched)."""
    counter = _Counter()
    with _host_wrappers(counter), counter:
        fn()
    sizes = [n for _, reads, writes in counter.calls for n, _ in reads + writes]
    logits = numel or max(sizes, default=1)
    moved = sum(n * b for _, reads, writes in counter.calls for n, b in reads + writes)
    logits_touches = [sum(2 * n >= logits for n, _ in reads + writes) for _, reads, writes in counter.calls]
    return {
        "ops": len(counter.calls),
        "launches": sum(name != "aten.scalar_tensor" for name, _, _ in counter.calls),
        "logits_ops": sum(touches > 0 for touches in logits_touches),
        "max_logits_touches": max(logits_touches, default=0),
        "bytes_per_logit": moved / logits,
        "host_reads": counter.host_reads,
        "op_names": [name for name, _, _ in counter.calls],
    }


def accelerator_strategy(on: bool = True) -> contextlib.AbstractContextManager[Any]:
    """multixent's accelerator strategy on CPU tensors (its private switch), for the duration."""
    from multixent import _compat

    return mock.patch.object(_compat, "ACCELERATOR_ON_CPU", on)


def table(
    rows: int = 4096, classes: int = 32000, dtype: torch.dtype = torch.float32, device: str = "cpu", ops: bool = False
) -> str:
    """The markdown table: forward+backward of a mean cross-entropy at ``rows × classes`` for multixent's
    accelerator strategy (forced on CPU tensors), its CPU strategy (CPU only), and ``F.cross_entropy``;
    ``ops``: then each loss's operations."""
    import torch.nn.functional as F

    import multixent

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, classes, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    t = torch.randint(0, classes, (rows,), generator=gen).to(device)

    def step(loss: Callable[..., Any]) -> Callable[[], None]:
        def run() -> None:
            x.grad = None
            loss(x, t).backward()

        return run

    losses: list[tuple[str, Callable[[], None], bool]] = [
        ("multixent, accelerator strategy", step(multixent.cross_entropy), True),
        ("F.cross_entropy", step(F.cross_entropy), False),
    ]
    if device == "cpu":
        losses.insert(1, ("multixent, CPU strategy", step(multixent.cross_entropy), False))
    lines = [
        f"{rows} × {classes} {str(dtype).removeprefix('torch.')} on {device}, forward+backward, reduction='mean'",
        "",
        "| loss | operations | device launches | on a logits-sized tensor | bytes read+written per logit "
        "| host reads |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    listed: list[str] = []
    for name, run, forced in losses:
        with accelerator_strategy(forced) if device == "cpu" else contextlib.nullcontext():
            run()  # warm: first-call imports and caches are not the call's work
            c = count(run, numel=rows * classes)
        figures = (c["ops"], c["launches"], c["logits_ops"], f"{c['bytes_per_logit']:.1f}", c["host_reads"])
        lines.append(f"| {name} | {' | '.join(map(str, figures))} |")
        listed.append(f"- {name}: {', '.join(c['op_names'])}")
    return "\n".join(lines + (["", *listed] if ops else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--ops", action="store_true", help="also list each loss's operations")
    args = parser.parse_args()
    print(table(args.rows, args.classes, ops=args.ops))


if __name__ == "__main__":
    main()
