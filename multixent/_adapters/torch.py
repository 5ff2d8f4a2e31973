"""PyTorch adapter: the generic forward and closed-form backward as an autograd Function.

The forward saves only the logits (an input) and two per-row numbers, the shift
``m`` and ``log Σ exp(z - m)`` (not lse: ``exp(z - lse)`` loses float32 precision at
large logits); the backward computes the gradient block by block in place, in
its own buffer (no other logits-sized memory). When the backward itself is
being differentiated (``create_graph=True``) it recomputes everything with
differentiable operations in one block, so double backward works. Under
``torch.compile`` everything is one block (the compiler fuses it) and the
eager index check is skipped (out-of-range indices give NaN).

Which way a call runs is decided in one place, :func:`route` (its docstring is the table).
The row losses have two Functions sharing their forward and backward: :class:`_RowLosses` for
eager autograd and ``torch.compile``, :class:`_RowLossesFunc` (torch.func's form: ``setup_context``,
a generated vmap rule, a ``jvp``) for torch.func transforms (``grad``, ``vmap``, ``jacrev``,
``jacfwd``, ``hessian``, ``jvp``; also ``is_grads_batched``) and forward mode. Under a transform
the math runs as under autograd recording: one block, no ``out=``, no in-place update of a
view. Class weights that require grad get their true gradient
(:func:`multixent._rows.row_losses_weight_vjp`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import struct
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from array_api_compat import array_namespace
from torch.autograd import forward_ad

from .. import _blocked, _compat, _formulas, _linear, _rows

#: Floating-point errors never warn here.
quiet = contextlib.nullcontext


#: torch functions refuse NumPy arrays beside tensors (``F.cross_entropy(tensor, ndarray)`` raises
#: TypeError); so does multixent, naming the conversion.
NUMPY_INPUTS: bool | str = "torch.as_tensor"


class Route(enum.Enum):
    """How a call runs here (:func:`route` chooses; its docstring is the table)."""

    OPTIONS = "tensor options autograd records: the math, recorded"
    COMPILED = "torch.compile: _RowLosses, one block"
    WRAPPED = "an array of a transform: _RowLossesFunc, one block"
    TRANSFORMED = "under a transform: _RowLossesFunc, one block"
    FORWARD = "eager forward mode: _RowLossesFunc"
    PLAIN = "nothing recorded: the math, blocks in place"
    FUSED = "a scalar loss of the logits alone: _Fused"
    AUTOGRAD = "eager autograd: _RowLosses, blocks in place"


#: The routes where the math runs in one block, out of place (no ``out=``, no setitem into views, no in-place
#: update of a batched tensor); those of them under torch.func.
_ONE_BLOCK = (Route.COMPILED, Route.WRAPPED, Route.TRANSFORMED)
_TRANSFORMS = (Route.WRAPPED, Route.TRANSFORMED)


def route(x: Any, *arrays: Any, scalar: bool = False, options: bool = False) -> Route:
    """How a call on the logits ``x`` and its other ``arrays`` (target, weight, tensor options; torch
    tensors, None skipped) runs: the first row that holds. ``scalar``: a "mean"/"sum" loss that may be fused
    (:func:`fused`); ``options``: label_smoothing or softcap are tensors autograd records.

    ===  ============================================  ===========  ===============================================
    row  condition                                     route        what runs
    ===  ============================================  ===========  ===============================================
    1    ``options``                                   OPTIONS      the math recorded by autograd (no Function),
                                                                    one block, out of place, the shift detached:
                                                                    the options get their gradients
    2    ``torch.compile`` is tracing                  COMPILED     :class:`_RowLosses`, one block, out of place;
                                                                    no eager index check (NaN instead)
    3    an array of a torch.func transform            WRAPPED      :class:`_RowLossesFunc` through torch.func
         (functorch's wrapper, or the legacy                        (generated vmap rule, closed-form ``jvp``):
         batching of ``is_grads_batched``)                          one block, out of place
    4    a torch.func transform is active (the         TRANSFORMED  as WRAPPED (``grad``, ``vmap``, ``jacrev``,
         arrays are captured by the function)                       ``jacfwd``, ``hessian``, ``jvp``)
    5    a forward-mode level and an array with a      FORWARD      :class:`_RowLossesFunc` eagerly (its ``jvp``;
         tangent (``torch.autograd.forward_ad``)                    blocks in place as 8)
    6    autograd records none of the arrays           PLAIN        the math alone: blocks of rows in place
    7    ``scalar``, autograd records ``x`` alone,     FUSED        :class:`_Fused`: the loss and its gradient in
         one block of rows (or on an accelerator)                   one pass; the backward scales the gradient
    8    otherwise: eager autograd                     AUTOGRAD     :class:`_RowLosses`: blocks of rows in place
                                                                    (one block on accelerators), the closed-form
                                                                    backward in its own buffer
    ===  ============================================  ===========  ===============================================

    One array's route says whether its values can be read now (:func:`concrete`, :func:`scalar`,
    :func:`_assert_none`, the backward's upstream gradient; :func:`_unread` asks rows 2 and 3 alone): not
    under COMPILED or WRAPPED; under TRANSFORMED not as a NumPy view.
    The backward is differentiable (one block, out of place) under ``create_graph=True``, WRAPPED or
    TRANSFORMED (:func:`_backward`). With a process group: COMPILED, WRAPPED, TRANSFORMED, FORWARD and
    OPTIONS are refused before the group's agreement (:func:`refuse_group`), a double backward in
    :func:`_backward`; FUSED is not asked for (the group's collectives are in the other routes).

    The one place that reads torch's private state: functorch's wrappers and active transforms (no public
    twin), and the forward-mode level: a cheap test before the public
    :func:`torch.autograd.forward_ad.unpack_dual` looks for a tangent on each array.
    """
    if options:
        return Route.OPTIONS
    if torch.compiler.is_compiling():
        return Route.COMPILED
    given = (x, *arrays)
    if _wrapped(given):
        return Route.WRAPPED
    if torch._C._are_functorch_transforms_active():
        return Route.TRANSFORMED
    if forward_ad._current_level >= 0 and _tangent(given):
        return Route.FORWARD
    if not _recorded(given):
        return Route.PLAIN
    return Route.FUSED if scalar and _fusable(given) else Route.AUTOGRAD


_functorch = torch._C._functorch


def _wrapped(arrays: tuple[Any, ...]) -> bool:
    """Whether a tensor of ``arrays`` (None: none) is a torch.func wrapper: functorch's, or the legacy
    batching of ``is_grads_batched``."""
    wrapped, legacy = _functorch.is_functorch_wrapped_tensor, _functorch.is_legacy_batchedtensor
    for a in arrays:  # noqa: SIM110 (a loop, not any(...): this runs a few times per call, on the hot path too)
        if a is not None and (wrapped(a) or legacy(a)):
            return True
    return False


def _unread(a: Any) -> bool:
    """Whether one tensor's values cannot be read now: its route is COMPILED or WRAPPED (rows 2 and 3 of
    :func:`route`, asked alone, in a fraction of the time)."""
    return torch.compiler.is_compiling() or _wrapped((a,))


def _tangent(arrays: tuple[Any, ...]) -> bool:
    """Whether a tensor of ``arrays`` (None: none) carries a forward-mode tangent (at the current level)."""
    unpack = forward_ad.unpack_dual
    return any(a is not None and unpack(a).tangent is not None for a in arrays)  # type: ignore[no-untyped-call]


def _recorded(arrays: tuple[Any, ...]) -> bool:
    """Whether autograd records a tensor of ``arrays`` (reverse mode; None: none)."""
    if torch.is_grad_enabled():
        for a in arrays:
            if a is not None and a.requires_grad:
                return True
    return False


def _fusable(arrays: tuple[Any, ...]) -> bool:
    """Autograd records the logits (the first array) alone, and they are one block of rows (or on an
    accelerator, one block anyway): the loss and its gradient in one pass (:class:`_Fused`)."""
    x = arrays[0]
    if not x.requires_grad or _recorded(arrays[1:]):
        return False
    return x.shape[0] <= _blocked.block_rows_for(x.shape[-1]) or _accelerated(x)


def scalar(a: Any) -> float | None:
    """A tensor option's value; None while compiling, under a transform, for meta tensors, or when
    autograd records it (``requires_grad``): the option stays a tensor and gets its gradient."""
    if a.is_meta or _unread(a) or (a.requires_grad and torch.is_grad_enabled()):
        return None
    return float(a)


def concrete(a: Any, in_group: bool = False) -> Any:
    """``a`` when its values can be read: not while compiling, nor a batched (vmapped) tensor; on an
    accelerator only with ``in_group`` (a call over a process group: its members agree on the host anyway,
    and an index out of range is then the same IndexError on every member, where a device-side assertion
    would stop one member and leave the others waiting in a collective) or ``MULTIXENT_SYNC_CHECKS=1``.

    A plain CPU tensor comes as a NumPy view (no copy): the index check's reductions then cost
    NumPy's microsecond, not a torch operation's dispatch and a host read. Not under an active
    torch.func transform (there even an unwrapped tensor has no storage for ``numpy()``), nor
    for a subclass (DTensor and others keep their own semantics): the tensor itself then.
    """
    if _accelerated(a) and not (in_group or _compat.SYNC_CHECKS):
        return None  # accelerators: checked on the device (:func:`_assert_none`), no host read
    if _unread(a):
        return None
    viewable = type(a) is torch.Tensor and a.is_cpu and a.layout == torch.strided and not a.requires_grad
    return a.numpy() if viewable and not torch._C._are_functorch_transforms_active() else a  # not TRANSFORMED


def _accelerated(a: Any) -> bool:
    """The accelerator strategy: a tensor off the CPU (CUDA, XPU, MPS), or any with
    :data:`multixent._compat.ACCELERATOR_ON_CPU`. One block, no host read."""
    return not a.is_cpu or _compat.ACCELERATOR_ON_CPU


#: ``log2(e)``: ``exp(a) = exp2(a · log2(e))``.
_LOG2_E = 1.4426950408889634

#: Elements from which a float32 ``exp`` on the CPU is ``exp2`` of a product (below, the extra
#: operation costs more).
_EXP2_FROM = 8192


def _cpu_exp_into(a: torch.Tensor) -> torch.Tensor:
    """``exp(a)`` over ``a``; large float32 tensors as ``exp2(a · log2 e)``: the blocked way's exponential
    on the CPU (:attr:`multixent._rows.Plan.exp_into`).

    A measured assumption about CPUs: torch's float32 ``exp`` there is slower than its ``exp2`` with
    the product (``benchmarks/results/figures.md`` records the figures and the command). The relative
    error is ``|a|·2⁻²⁴`` (the product's rounding) against half an ulp: an entry of ``exp(z - m)`` at
    ``a = -80`` is off by 5e-6 of itself, and ``log Σ exp`` by at most ``2 log C·2⁻²⁴`` (the softmax's
    mean of ``|a|`` is at most ``2 log C``), within float32's rounding of the loss.
    """
    if a.dtype == torch.float32 and a.numel() >= _EXP2_FROM:
        return torch.exp2(torch.mul(a, _LOG2_E, out=a), out=a)
    return torch.exp(a, out=a)


def _blocked_plan(x: Any, in_place: bool, may_ignore: bool) -> _rows.Plan:
    """The eager plan of ``x``: on the CPU, blocks of rows and its exponential; on accelerators, one block
    and the class indices asserted on the device."""
    if _accelerated(x):
        return _rows.eager_plan(None, in_place, may_ignore, assert_none=_device_assertion(x))
    return _rows.eager_plan(x.shape[-1], in_place, may_ignore, _cpu_exp_into)


def _compiled_transform() -> bool:
    """``torch.compile`` traces a torch.func transform (``grad``, ``vmap``, ...): autograd differentiates the
    math, and Inductor compiles that derivative as an inference graph, where in torch 2.13 the scatter that
    differentiates a gather can come out lost (the gradient without the target's term, for some shapes and
    options; not with ``reorder_for_locality`` off, a pass run on inference graphs only; upstream,
    pytorch/pytorch#136662). The target's logit is then picked by a one-hot select."""
    return torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def _assert_none(mask: Any, message: str) -> bool:
    """Asserts on the device that ``mask`` holds no True: ``torch._assert_async``, torch's own check for its
    losses (no host synchronisation; a failure is a device-side assertion, as for ``F.cross_entropy``, and
    at once on the CPU). False, asserting nothing, for a mask whose values cannot be read now: a batched
    tensor, or one the user's ``torch.compile`` traces (not the compiled strategy's, :func:`_compiled`).
    Compiled, the assertion is Inductor's (a ``tl.device_assert`` on a GPU, which Triton drops when
    Inductor's ``assert_indirect_indexing`` is off): False there too, so such rows' loss is NaN as well."""
    compiling = torch.compiler.is_compiling()
    readable = _compiled_strategy_tracing if compiling else not _wrapped((mask,))
    if not readable:  # the user's trace, or a batched mask: NaN, the traced answer
        return False
    torch._assert_async(mask.any().logical_not(), message)
    return not compiling


def _device_assertion(x: Any) -> Any:
    """:func:`_assert_none` for the accelerator strategy (:attr:`multixent._rows.Plan.assert_none`): class
    indices checked on the device, unless ``MULTIXENT_SYNC_CHECKS=1`` read them on the host instead."""
    return _assert_none if _accelerated(x) and not _compat.SYNC_CHECKS else None


def plan(
    x: Any, *inputs: Any, may_ignore: bool, differentiable: bool = False, in_op: bool = False, shard: Any = None
) -> _rows.Plan:
    """Eager: blocks of rows computed in place; compiled or transformed: one block, out of place.

    ``inputs`` are the call's other arrays: out= refuses any that autograd
    records (cross_entropy_and_grad under grad mode), and then nothing is in place.
    ``differentiable``: the math itself is recorded (a backward with ``create_graph``,
    a transform, forward mode): one block, out of place, the row max's shift detached.
    ``in_op``: inside a custom op (the linear chunks), always eager, in place: blocks of rows on the CPU,
    one block on accelerators.
    ``shard``: the class axis split over a process group (:func:`shard`).
    """
    assertion = _device_assertion(x)
    if in_op:  # a chunk's logits, ours: in place (on accelerators one block, the chunk sized for memory)
        how = _blocked_plan(x, True, may_ignore)
    elif differentiable:
        stop, one_hot = torch.Tensor.detach, _compiled_transform()
        how = _rows.Plan(may_ignore=may_ignore, stop_gradient=stop, one_hot_target=one_hot, assert_none=assertion)
    elif route(x, *inputs) in _ONE_BLOCK:
        how = _rows.Plan(may_ignore=may_ignore, one_hot_target=_compiled_transform(), assert_none=assertion)
    else:  # eager: blocks for the CPU's cache; one block on accelerators; out= refuses recorded inputs
        recorded = _recorded((x, *inputs))
        how = _blocked_plan(x, not recorded, may_ignore)
    return how if shard is None else dataclasses.replace(how, shard=shard)


# --------------------------------------------------------------------------
# A class axis split over a process group


class GroupSum(torch.autograd.Function):
    """``all_reduce(SUM)`` of a per-row array; its result is the same on every member and
    each member differentiates its own copy: the backward is the identity."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, group: Any) -> torch.Tensor:
        out = a.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        return g, None


class GroupSpread(torch.autograd.Function):
    """The identity on a replicated per-row value entering a member's own (sharded) result:
    its gradient sums every member's contribution (``all_reduce(SUM)``)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, group: Callable[[], Any]) -> torch.Tensor:
        ctx.group = group  # held weakly (:func:`held_weakly`)
        return a.view_as(a)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        g = g.clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group())
        return g, None


def held_weakly(group: Any) -> Callable[[], Any]:
    """``group`` through a weak reference. The autograd graph of a loss (a script's global, kept
    until the interpreter exits) must not keep the process group alive past
    ``destroy_process_group``: gloo's threads, destroyed at exit, then abort the process
    (``terminate called without an active exception``; about 1 run in 5 of the README's torchrun block)."""
    ref = weakref.ref(group)

    def get() -> Any:
        alive = ref()
        if alive is None:
            raise RuntimeError("multixent: the process group of this loss was destroyed before its backward")
        return alive

    return get


def _group_max(a: torch.Tensor, group: Any) -> torch.Tensor:
    out = a.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


#: The errors a member's checks raise that every member of its group raises too (in this order of lookup).
_SHARED_ERRORS: tuple[type[Exception], ...] = (IndexError, TypeError, ValueError, NotImplementedError, RuntimeError)
#: The bytes of an error's message carried by the agreement (longer ones are cut).
_MESSAGE_BYTES = 480


def _exchange(group: Any, device: Any, row: list[int], error: BaseException | None) -> list[list[int]]:
    """Every member's ``row`` of ints, by rank, in one ``all_gather``; with it goes each member's ``error``.

    If any member has an error, every member raises the first such member's (lowest rank): the same
    class and message everywhere, naming that rank. No member is left waiting in a collective.
    """
    code, message = 0, b""
    if error is not None:
        code = 1 + next(i for i, kind in enumerate(_SHARED_ERRORS) if isinstance(error, kind))
        message = str(error).encode()[:_MESSAGE_BYTES]
    padded = [*row, code, len(message), *message, *bytes(_MESSAGE_BYTES - len(message))]
    mine = torch.tensor(padded, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).tolist()
    n = len(row)
    failed = [r for r, t in enumerate(table) if t[n]]
    if failed:
        first = table[failed[0]]
        text = bytes(first[n + 2 : n + 2 + first[n + 1]]).decode(errors="replace")
        raise _SHARED_ERRORS[first[n] - 1](f"{text} [raised on rank {failed[0]} of the process group]")
    return [t[:n] for t in table]


def _agree(group: Any, device: Any, error: BaseException | None) -> None:
    """Raise on every member the error any member has (see :func:`_exchange`; a row the size of
    :func:`shard`'s, so that a member still in that agreement gets an error, not a collective mismatch)."""
    _exchange(group, device, [0] * (2 + _AGREED_SLOTS), error)


#: The agreed values a member sends (:func:`shard`): always this many, so that members in different calls
#: still exchange rows of one size (then their ``function`` differs).
_AGREED_SLOTS = 16


def _encode(value: Any) -> int:
    """An agreed value as an int64: ints as such, floats by their bits, strings by their first 8 bytes."""
    if isinstance(value, float):
        return int(struct.unpack("<q", struct.pack("<d", value))[0])
    if isinstance(value, str):
        return int.from_bytes(value.encode()[:8].ljust(8, b"\0"), "big", signed=True)
    return int(value)


def _decode(code: int, like: Any) -> Any:
    if isinstance(like, float):
        return struct.unpack("<d", struct.pack("<q", code))[0]
    if isinstance(like, str):
        return code.to_bytes(8, "big", signed=True).rstrip(b"\0").decode(errors="replace")
    return code


def _disagreement(agreed: tuple[tuple[str, Any], ...], columns: list[list[int]]) -> ValueError | None:
    """A ValueError naming the first agreed value that differs across the members, with its values by rank."""
    for (name, mine), values in zip(agreed, columns, strict=False):
        if len(set(values)) > 1:
            by_rank = [_decode(v, mine) for v in values]
            return ValueError(
                f"multixent: the members of the process group disagree on {name}: {by_rank} by rank "
                "(it must be the same on every member)"
            )
    return None


def _agreement_row(
    class_offset: int | None, num_local: int, agreed: tuple[tuple[str, Any], ...], error: BaseException | None
) -> list[int]:
    """``(offset or -1, C_local, *agreed values)``, padded to :data:`_AGREED_SLOTS` (zeros with an error)."""
    if len(agreed) > _AGREED_SLOTS:
        raise AssertionError(f"multixent: at most {_AGREED_SLOTS} agreed values; got {len(agreed)}")
    if error is not None:
        return [-1, 0, *[0] * _AGREED_SLOTS]
    values = [_encode(value) for _, value in agreed]
    return [-1 if class_offset is None else class_offset, num_local, *values, *[0] * (_AGREED_SLOTS - len(values))]


def _tiling(offsets: list[int], sizes: list[int]) -> list[int]:
    """Every member's class offset (by rank): equal shards without offsets (-1), or offsets tiling
    ``[0, Σ sizes)``; else the ValueError, the same on every member (they all hold this table)."""
    if all(o == -1 for o in offsets):
        if len(set(sizes)) != 1:
            raise ValueError(
                f"multixent: the class shards over the group have sizes {sizes} (by rank): unequal shards need "
                "class_offset= on every member"
            )
        return [r * sizes[0] for r in range(len(sizes))]
    if any(o == -1 for o in offsets):
        raise ValueError(
            f"multixent: class_offset is given on some members of the group only ({offsets} by rank, -1: none)"
        )
    order = sorted(range(len(offsets)), key=lambda r: offsets[r])
    ends = [offsets[r] + sizes[r] for r in order]
    if [offsets[r] for r in order] != [0, *ends[:-1]]:
        raise ValueError(
            "multixent: the class shards (class_offset, C_local) by rank "
            f"{list(zip(offsets, sizes, strict=True))} do not tile [0, C) without gaps or overlaps"
        )
    return offsets


def shard(
    group: Any,
    class_offset: int | None,
    num_local: int,
    arrays: tuple[Any, ...],
    error: BaseException | None = None,
    agreed: tuple[tuple[str, int], ...] = (),
) -> _formulas.Shard:
    """The class axis split over the torch process ``group``: this member holds ``num_local``
    classes from ``class_offset`` (None: ``rank · num_local``, equal shards).

    The agreement: one ``all_gather`` of ``(offset, C_local, arrays are tensors, *agreed, error)``
    from every member, so that every member sees the same layout and raises the same error:
    a member's ``error`` (its arguments failed a check), arrays that are not torch tensors,
    ``agreed`` values (what must be equal across members: rows, dtypes, options) that differ,
    or a layout that is not equal shards without offsets or offsets (on every member) tiling
    ``[0, C)``; ``C = Σ C_local``.
    """
    tensors = [a for a in arrays if a is not None]
    foreign = sorted({type(a).__module__ for a in tensors if not isinstance(a, torch.Tensor)})
    device = next((a.device for a in tensors if isinstance(a, torch.Tensor)), torch.device("cpu"))
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    if error is None and foreign:
        error = TypeError(
            f"multixent: group is a torch ProcessGroup: the arrays must be torch tensors on every member; got {foreign}"
        )
    table = _exchange(group, device, _agreement_row(class_offset, num_local, agreed, error), error)
    offsets, sizes, *columns = (list(col) for col in zip(*table, strict=True))
    mismatch = _disagreement(agreed, columns)
    if mismatch is not None:
        raise mismatch
    offsets = _tiling(offsets, sizes)
    offset = offsets[dist.get_rank(group)]
    member = held_weakly(group)
    return _formulas.Shard(
        num_classes=sum(sizes),
        offset=lambda: offset,
        max=lambda a: _group_max(a, member()),
        sum=lambda a: GroupSum.apply(a, member()),  # type: ignore[no-untyped-call]
        spread=lambda a: GroupSpread.apply(a, member),  # type: ignore[no-untyped-call]
        agree=lambda error: _agree(member(), device, error),
    )


def _forward(x: Any, target: Any, weight: Any, opts: Any, may_ignore: bool, xp: Any, shard: Any) -> Any:
    """``(ce, lse)`` per row, and the per-row stats ``(m, lse_s)`` the backward takes (not differentiable)."""
    how = plan(x, target, weight, may_ignore=may_ignore, shard=shard)
    return _rows.row_losses(x, target, weight, opts, how, xp=xp, keep_stats=True)


def _save(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, target, weight, opts, may_ignore, xp, shard = inputs
    _, _, shift, lse_shifted = output
    ctx.mark_non_differentiable(shift, lse_shifted)
    ctx.save_for_backward(x, target, weight, shift, lse_shifted)
    ctx.opts, ctx.may_ignore, ctx.xp, ctx.shard = opts, may_ignore, xp, shard


def _backward(ctx: Any, ce_bar: torch.Tensor, lse_bar: torch.Tensor, *_: Any) -> Any:
    """The closed-form backward of both Functions: in place, block by block; recomputed with differentiable
    operations in one block under ``create_graph=True`` or a transform."""
    x, target, weight, shift, lse_shifted = ctx.saved_tensors
    if ce_bar is None:  # only lse used (the eager Function does not materialise unused gradients)
        ce_bar = torch.zeros_like(shift)
    differentiable = torch.is_grad_enabled() or route(x, ce_bar, lse_bar) in _TRANSFORMS
    if differentiable and ctx.shard is not None:
        raise NotImplementedError(
            "multixent: a double backward (create_graph=True) or a torch.func transform with group="
        )
    how = plan(x, may_ignore=ctx.may_ignore, differentiable=differentiable, shard=ctx.shard)
    x_bar, t_bar = _rows.row_losses_vjp(
        x,
        target,
        weight,
        None if differentiable else (shift, lse_shifted),
        ce_bar,
        lse_bar,
        ctx.opts,
        how,
        xp=ctx.xp,
        target_grad=ctx.needs_input_grad[1],
    )
    w_bar = None
    if ctx.needs_input_grad[2]:
        w_bar = _rows.row_losses_weight_vjp(x, target, weight, ce_bar, ctx.opts, how, xp=ctx.xp)
    return x_bar, t_bar, w_bar, None, None, None, None


class _RowLosses(torch.autograd.Function):
    """The row losses for torch.autograd: eager autograd and ``torch.compile`` (routes AUTOGRAD and
    COMPILED of :func:`route`).

    ``forward(ctx, ...)``, not torch.func's form: ``apply`` binds a ``setup_context`` Function's arguments
    with ``inspect.signature`` on every call (about 10 µs). No ``jvp``: dynamo refuses a Function with one.
    """

    @staticmethod
    def forward(ctx: Any, x: Any, target: Any, weight: Any, opts: Any, may_ignore: bool, xp: Any, shard: Any) -> Any:
        output = _forward(x, target, weight, opts, may_ignore, xp, shard)
        _save(ctx, (x, target, weight, opts, may_ignore, xp, shard), output)
        if not torch.compiler.is_compiling():  # dynamo traces no set_materialize_grads
            ctx.set_materialize_grads(False)  # no zeros for the outputs the loss does not use (lse, stats)
        return output

    backward = staticmethod(_backward)


class _RowLossesFunc(torch.autograd.Function):
    """The row losses for torch.func and forward mode (routes WRAPPED, TRANSFORMED and FORWARD of
    :func:`route`): torch.func's form (``setup_context``, a generated vmap rule) and the closed-form
    ``jvp`` (:func:`multixent._rows.row_losses_jvp`).

    Not one class with :class:`_RowLosses`: dynamo refuses a Function with a ``jvp`` (``Unsupported custom
    jvp``), torch.func one without ``setup_context``, and forward mode through the recorded math instead
    of this ``jvp`` loses a probability target's tangent where it is 0 (gradgradcheck's forward over
    reverse, ``test_gradcheck_batched[probs-*]``).
    """

    generate_vmap_rule = True
    forward = staticmethod(_forward)
    backward = staticmethod(_backward)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        _save(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:3])

    @staticmethod
    def jvp(ctx: Any, x_dot: Any, target_dot: Any, weight_dot: Any, *_: Any) -> Any:
        x, target, weight = ctx.saved_tensors
        if ctx.shard is not None:
            raise NotImplementedError("multixent: forward-mode differentiation with group=")
        how = plan(x, may_ignore=ctx.may_ignore, differentiable=True)
        _, _, ce_dot, lse_dot = _rows.row_losses_jvp(
            x, target, weight, x_dot, target_dot, ctx.opts, how, xp=ctx.xp, weight_dot=weight_dot
        )
        return ce_dot, lse_dot, None, None


def row_losses(
    x: Any,
    target: Any,
    weight: Any,
    opts: _formulas.Options,
    may_ignore: bool,
    xp: Any,
    shard: Any = None,
    need_lse: bool = True,
) -> tuple[Any, Any]:
    """Per-row ``(ce, lse)`` by the call's :func:`route`. ``need_lse=False``: without autograd, ``lse``
    is not computed (None)."""
    how = route(x, target, weight, options=len(opts.arrays) > 0)
    if how is Route.PLAIN:  # nothing to differentiate: the math alone, blocks in place
        blocked = _blocked_plan(x, True, may_ignore)
        if shard is not None:
            blocked = dataclasses.replace(blocked, shard=shard)
        return _rows.row_losses(x, target, weight, opts, blocked, xp=xp, need_lse=need_lse)  # type: ignore[return-value]
    if how is Route.OPTIONS:  # autograd differentiates the math itself, options included
        recorded = plan(x, may_ignore=may_ignore, differentiable=True)
        opts = opts.astype(_formulas.compute_dtype(x.dtype, xp), xp)
        return _rows.row_losses(x, target, weight, opts, recorded, xp=xp)  # type: ignore[return-value]
    function: Any = _RowLosses if how is Route.AUTOGRAD or how is Route.COMPILED else _RowLossesFunc
    ce, lse, _, _ = function.apply(x, target, weight, opts, may_ignore, xp, shard)
    return ce, lse


class _Fused(torch.autograd.Function):
    """A loss computed with its gradient (the FUSED route of :func:`route`): the backward scales the
    gradient, or gives it away as it is for the usual upstream 1 (autograd then keeps it as ``x.grad``
    without a copy).

    The gradient is saved with ``save_for_backward`` and the logits by the node before, :class:`_Logits`:
    saved-tensor hooks apply to both (``torch.autograd.graph.save_on_cpu`` offloads them,
    ``torch.utils.checkpoint`` drops them and computes them again), and the first backward unpacks the
    gradient alone, so that, as for ``F.cross_entropy``, an in-place change of the logits since the forward
    does not concern it. That backward spends the gradient; a second one (a retained graph) or
    ``create_graph=True`` recomputes it through the ordinary route at the saved logits (an in-place change
    since the forward raises torch's own error there), differentiated through an alias of them, which their
    hooks do not see (they run once, when autograd hands the result on) but whose graph reaches them."""

    @staticmethod
    def forward(ctx: Any, x: Any, logits: Any, loss: Any) -> Any:
        value, grad = loss(x, True)
        ctx.save_for_backward(grad)
        ctx.logits, ctx.loss, ctx.spent = logits, loss, False
        return value

    @staticmethod
    def backward(ctx: Any, g: Any) -> Any:
        if ctx.spent or torch.is_grad_enabled():  # a second backward, or create_graph=True: the usual route
            (x,) = ctx.logits.saved_tensors
            with torch.enable_grad():
                alias = x.view_as(x)
                (x_bar,) = torch.autograd.grad(ctx.loss(alias), alias, g, create_graph=torch.is_grad_enabled())
            return x_bar, None, None
        (grad,) = ctx.saved_tensors
        ctx.spent = True
        return _times_upstream(grad, g), None, None


class _Logits(torch.autograd.Function):
    """The identity, saving the logits given to :class:`_Fused` for its recomputation (a node of their own:
    their saved tensor is unpacked only when the gradient is recomputed, and freed when autograd has passed
    this node)."""

    @staticmethod
    def forward(ctx: Any, x: Any) -> Any:
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: Any) -> Any:
        return g


def _times_upstream(grad: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """A saved gradient computed in the forward, spent by this backward, times the backward's upstream ``g``:
    out of place for an upstream batched by torch.func (``is_grads_batched``); on accelerators in place (no host
    read, no second copy); elsewhere the usual upstream 1 is read and skips the product (the gradient as it is),
    others out of place. Handed on untracked (``.data``): what changes it later (an in-place hook, ``.grad``'s
    sum, the product here) concerns no saved tensor, since a later backward computes the gradient again."""
    grad = grad.data
    if _unread(g):
        return (grad * g).to(grad.dtype)
    if _accelerated(grad):
        return grad.mul_(g.to(grad.dtype))
    return grad if bool(g == 1) else (grad * g).to(grad.dtype)


def fused(x: Any, target: Any, weight: Any, loss: Callable[..., Any]) -> Any:
    """:class:`_Fused` where the call's :func:`route` is FUSED (autograd records the logits alone, eagerly,
    in one block); else None. ``loss(x)``: the scalar loss at the logits ``x`` through the usual route;
    ``loss(x, True)``: ``(loss, ∂loss/∂x)`` in one pass (compiled on accelerators with
    :data:`multixent._compat.COMPILED_STRATEGY`)."""
    if not x.requires_grad or route(x, target, weight, scalar=True) is not Route.FUSED:  # FUSED records x
        return None
    if _compat.COMPILED_STRATEGY and _accelerated(x):
        loss = _compiled(loss)
    logits = _Logits.apply(x)  # type: ignore[no-untyped-call]
    return _Fused.apply(logits, logits.grad_fn, loss)  # type: ignore[no-untyped-call]


#: True while the compiled strategy's pass runs (:func:`_compiled`): traced, it still asserts the class
#: indices on the device (:func:`_assert_none`), as the eager strategy does; dynamo guards on this value.
_compiled_strategy_tracing = False


@contextlib.contextmanager
def _compiled_strategy() -> Iterator[None]:
    """While the compiled strategy's pass runs (:data:`_compiled_strategy_tracing`)."""
    global _compiled_strategy_tracing
    _compiled_strategy_tracing = True
    try:
        yield
    finally:
        _compiled_strategy_tracing = False


def _compiled(loss: Callable[..., Any]) -> Callable[..., Any]:
    """``loss`` whose one pass ``loss(x, True)`` runs through ``torch.compile(dynamic=True)``
    (:func:`_compiled_pass`); ``loss(x)`` (a second backward's recomputation) stays eager."""

    def run(rows: Any, grad: bool = False) -> Any:
        if not grad:
            return loss(rows)
        with _compiled_strategy():
            return _compiled_pass()(loss, rows)

    return run


@functools.cache
def _compiled_pass() -> Callable[..., Any]:
    """``(loss, x) ↦ loss(x, True)`` through ``torch.compile(dynamic=True)``, made once: compiled on the first
    call of each kind (reduction, options, dtypes, which arrays are given; the guards dynamo keeps on the
    function ``loss`` and what it holds) for every shape; past dynamo's recompile limit a new kind runs
    eagerly."""
    return torch.compile(lambda loss, x: loss(x, True), dynamic=True)


def _compiled_chunk(
    z: Any, target: Any, weight: Any, ce_scale: Any, lse_scale: Any, spec: _linear.Spec, xp: Any, products: Any
) -> Any:
    """``linear_cross_entropy``'s chunk pass under the compiled strategy
    (:attr:`multixent._linear.Hooks.chunk_losses_and_grad`): ``(ce, lse, ḡ)`` of the chunk's logits ``z`` through
    ``torch.compile(dynamic=True)`` (:func:`_compiled_chunk_pass`), ``ḡ`` rounded to the products' dtype inside."""
    opts, may_ignore = spec.opts, spec.plan.may_ignore
    with _compiled_strategy():
        return _compiled_chunk_pass()(z, target, weight, ce_scale, lse_scale, opts, may_ignore, products, xp)


@functools.cache
def _compiled_chunk_pass() -> Callable[..., Any]:
    """The chunk pass of :func:`_compiled_chunk`, made once (one graph per kind of call, for every chunk shape).
    Traced, :func:`plan` gives one block out of place, the class indices asserted in the graph."""

    def chunk(
        z: Any, target: Any, weight: Any, ce_s: Any, lse_s: Any, opts: Any, may_ignore: bool, dtype: Any, xp: Any
    ) -> Any:
        how = plan(z, may_ignore=may_ignore)
        ce, lse, g = _rows.row_losses_and_grad(z, target, weight, ce_s, lse_s, opts, how, xp=xp)
        return ce, lse, g.to(dtype)

    return torch.compile(chunk, dynamic=True)


def refuse_group(x: Any, target: Any, weight: Any, opts: _formulas.Options) -> None:
    """NotImplementedError where a group is not supported: compiled, under a torch.func transform or
    forward mode, class weights requiring grad (each member would hold a part of their gradient),
    label_smoothing or softcap as tensors autograd records (likewise: their gradient mixes replicated
    and per-member parts, which the group's autograd Functions do not tell apart)."""
    tensors = [a for a in (x, target, weight) if isinstance(a, torch.Tensor)]  # not yet checked: any arrays
    how = route(*tensors) if tensors else Route.PLAIN
    if how in _ONE_BLOCK:
        raise NotImplementedError("multixent: group= under torch.compile or a torch.func transform")
    if how is Route.FORWARD:
        raise NotImplementedError("multixent: forward-mode differentiation with group=")
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("multixent: class weights that require grad with group=")
    if opts.arrays:
        raise NotImplementedError(
            "multixent: label_smoothing or softcap as a tensor that requires grad, with group= (pass a float, "
            "or a tensor autograd does not record)"
        )


# --------------------------------------------------------------------------
# linear_cross_entropy. Each chunk loop runs inside a custom op (torch.library):
# opaque to torch.compile, which then traces one call whatever the number of
# chunks, and always run eagerly (blocks in place, autocast off). The autograd
# Functions around them: "mean"/"sum" compute the gradients in the forward and
# scale them in the backward; "none" recomputes each chunk in the backward.

_OPTS = "int ignore_index, float label_smoothing, float? softcap, bool may_ignore, int chunk"


#: The custom ops' namespace: the package's name (a copy imported under another name registers its own).
_NAMESPACE = __name__.partition(".")[0]


def _op(name: str, schema: str) -> Any:
    return torch.library.custom_op(f"{_NAMESPACE}::{name}", mutates_args=(), schema=schema)


def _eager(h: torch.Tensor, w: torch.Tensor, opts: tuple[Any, ...], shard: Any = None) -> tuple[Any, Any, Any, Any]:
    """``(spec, xp, hooks, context)`` for running a chunk loop in an op: blocks in place, no autocast."""
    ignore_index, smoothing, softcap, may_ignore, chunk = opts
    how = plan(w.T, may_ignore=may_ignore, in_op=True, shard=shard)  # a chunk's (rows, V) logits, in place
    spec = _linear.Spec(_formulas.Options(ignore_index, smoothing, softcap), how, chunk)
    context = contextlib.ExitStack()
    context.enter_context(torch.no_grad())
    context.enter_context(torch.autocast(h.device.type, enabled=False))
    matmul_to = _matmul_to if _half_products(h) else None  # accelerators: products in the inputs' dtype
    hooks = _linear.Hooks(matmul_add=_matmul_add, matmul_to=matmul_to)
    if _compat.COMPILED_STRATEGY and _accelerated(h) and shard is None:  # a group's collectives stay eager
        hooks = dataclasses.replace(hooks, chunk_losses_and_grad=_compiled_chunk)
    return spec, array_namespace(h), hooks, context


def _half_products(h: torch.Tensor) -> bool:
    """Whether the linear products take half-precision operands as they are (:func:`_matmul_to`): on CUDA and
    XPU where torch has ``out_dtype`` products (float16/bfloat16 operands, a float32 result), and on CPU
    tensors under :data:`multixent._compat.ACCELERATOR_ON_CPU` (to test the route). Elsewhere the classifier
    is cast to the compute dtype once."""
    if h.is_cpu:
        return _compat.ACCELERATOR_ON_CPU
    return h.device.type in ("cuda", "xpu") and _has_out_dtype()


def _matmul_to(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` of half-precision operands, accumulated and returned in ``dtype``
    (:attr:`multixent._linear.Hooks.matmul_to`): one tensor-core product (``out_dtype``); on CPU tensors the
    operands cast first (the same products)."""
    return a.to(dtype) @ b.to(dtype) if a.is_cpu else torch.mm(a, b, out_dtype=dtype)


def _matmul_add(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` in place (:attr:`multixent._linear.Hooks.matmul_add`); half-precision operands into a
    float32 ``acc`` in one tensor-core product (``addmm``'s ``out_dtype``; where this torch's ``addmm`` refuses
    a float32 input beside them: ``mm``'s, then added), on CPU tensors cast first (the same sum)."""
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b)
    if a.is_cpu:
        return acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
    if _addmm_into_wider(acc.device.type):
        return torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    return acc.add_(torch.mm(a, b, out_dtype=acc.dtype))


@functools.cache
def _has_out_dtype() -> bool:
    """Whether this torch's ``mm`` takes ``out_dtype`` (a float32 result of bfloat16 operands)."""
    meta = torch.empty(1, 1, dtype=torch.bfloat16, device="meta")
    try:
        torch.mm(meta, meta, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


@functools.cache
def _addmm_into_wider(device_type: str) -> bool:
    """Whether this torch's ``addmm`` on ``device_type`` adds bfloat16 operands' product into a float32 input
    (``out_dtype``, the input as ``out``): asked of the device once (older CUDA kernels require the input in the
    operands' dtype; their argument checks raise before any launch)."""
    one = torch.ones(1, 1, dtype=torch.bfloat16, device=device_type)
    acc = torch.zeros(1, 1, device=device_type)
    try:
        torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def _compute_dtype(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.dtype:
    return _linear.compute_dtype(h, w, b, array_namespace(h))  # type: ignore[no-any-return]


def _grads_or_empty(grads: tuple[Any, Any, Any], h: torch.Tensor) -> tuple[Any, Any, Any]:
    """``b̄`` is an empty tensor without bias (an op returns tensors, not None)."""
    return grads[0], grads[1], h.new_empty(0) if grads[2] is None else grads[2]


# Each op's body is a plain function taking ``shard`` too: with a group (a ProcessGroup
# cannot pass through an op's schema) the Functions call the bodies directly, eagerly.


def _rows_body(h: Any, w: Any, b: Any, t: Any, weight: Any, *opts: Any, shard: Any = None) -> Any:
    spec, xp, hooks, context = _eager(h, w, opts, shard)
    with context:
        return _linear.rows(h, w, b, t, weight, spec, xp=xp, hooks=hooks)


def _loss_and_grads_body(
    h: Any, w: Any, b: Any, t: Any, weight: Any, ce_s: Any, lse_s: Any, *opts: Any, shard: Any = None
) -> Any:
    spec, xp, hooks, context = _eager(h, w, opts, shard)
    with context:
        (ce, lse), grads = _linear.loss_and_grads(h, w, b, t, weight, ce_s, lse_s, spec, xp=xp, hooks=hooks)
    return ce, lse, *_grads_or_empty(grads, h)


def _rows_vjp_body(
    h: Any, w: Any, b: Any, t: Any, weight: Any, ce_bar: Any, lse_bar: Any, *opts: Any, shard: Any = None
) -> Any:
    spec, xp, hooks, context = _eager(h, w, opts, shard)
    with context:
        grads = _linear.rows_vjp(h, w, b, t, weight, ce_bar, lse_bar, spec, xp=xp, hooks=hooks)
    return _grads_or_empty(grads, h)


def _weight_vjp_body(h: Any, w: Any, b: Any, t: Any, ce_bar: Any, *opts: Any, shard: Any = None) -> Any:
    spec, xp, hooks, context = _eager(h, w, opts, shard)
    with context:
        return _linear.weight_vjp(h, w, b, t, ce_bar, spec, xp=xp, hooks=hooks)


@_op("linear_rows", f"(Tensor h, Tensor w, Tensor? b, Tensor t, Tensor? weight, {_OPTS}) -> (Tensor, Tensor)")
def _rows_op(h: Any, w: Any, b: Any, t: Any, weight: Any, *opts: Any) -> Any:
    return _rows_body(h, w, b, t, weight, *opts)


@_rows_op.register_fake
def _rows_fake(h: Any, w: Any, b: Any, t: Any, weight: Any, *opts: Any) -> Any:
    dtype = _compute_dtype(h, w, b)
    return h.new_empty(h.shape[0], dtype=dtype), h.new_empty(h.shape[0], dtype=dtype)


@_op(
    "linear_loss_and_grads",
    f"(Tensor h, Tensor w, Tensor? b, Tensor t, Tensor? weight, Tensor ce_scale, Tensor? lse_scale, {_OPTS}) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _loss_and_grads_op(h: Any, w: Any, b: Any, t: Any, weight: Any, ce_s: Any, lse_s: Any, *opts: Any) -> Any:
    return _loss_and_grads_body(h, w, b, t, weight, ce_s, lse_s, *opts)


@_loss_and_grads_op.register_fake
def _(h: Any, w: Any, b: Any, t: Any, weight: Any, ce_s: Any, lse_s: Any, *opts: Any) -> Any:
    ce, lse = _rows_fake(h, w, b, t, weight, *opts)
    return ce, lse, torch.empty_like(h), torch.empty_like(w), h.new_empty(0) if b is None else torch.empty_like(b)


@_op(
    "linear_rows_vjp",
    f"(Tensor h, Tensor w, Tensor? b, Tensor t, Tensor? weight, Tensor ce_bar, Tensor lse_bar, {_OPTS}) "
    "-> (Tensor, Tensor, Tensor)",
)
def _rows_vjp_op(h: Any, w: Any, b: Any, t: Any, weight: Any, ce_bar: Any, lse_bar: Any, *opts: Any) -> Any:
    return _rows_vjp_body(h, w, b, t, weight, ce_bar, lse_bar, *opts)


@_rows_vjp_op.register_fake
def _(h: Any, w: Any, b: Any, t: Any, weight: Any, ce_bar: Any, lse_bar: Any, *opts: Any) -> Any:
    return torch.empty_like(h), torch.empty_like(w), h.new_empty(0) if b is None else torch.empty_like(b)


@_op("linear_weight_vjp", f"(Tensor h, Tensor w, Tensor? b, Tensor t, Tensor ce_bar, {_OPTS}) -> Tensor")
def _weight_vjp_op(h: Any, w: Any, b: Any, t: Any, ce_bar: Any, *opts: Any) -> Any:
    return _weight_vjp_body(h, w, b, t, ce_bar, *opts)


def _ops(call: _linear.LinearCall) -> tuple[Any, Any, Any, Any]:
    """The chunk loops ``(rows, loss_and_grads, rows_vjp, weight_vjp)``: the custom ops, or with a
    group their bodies (eager, the group's collectives inside)."""
    if call.shard is None:
        return _rows_op, _loss_and_grads_op, _rows_vjp_op, _weight_vjp_op
    bodies = (_rows_body, _loss_and_grads_body, _rows_vjp_body, _weight_vjp_body)
    return tuple(functools.partial(f, shard=call.shard) for f in bodies)  # type: ignore[return-value]


@_weight_vjp_op.register_fake
def _(h: Any, w: Any, b: Any, t: Any, ce_bar: Any, *opts: Any) -> Any:
    return w.new_empty(w.shape[0], dtype=_compute_dtype(h, w, b))


def _op_opts(call: _linear.LinearCall) -> tuple[Any, ...]:
    opts = call.opts
    return opts.ignore_index, float(opts.label_smoothing), opts.softcap, call.may_ignore, call.chunk


class _LinearScalar(torch.autograd.Function):
    """``linear_cross_entropy``'s "mean"/"sum": the gradients computed in the forward (one pass over the chunks),
    scaled by the backward's upstream gradient.

    The gradients and the inputs are saved with ``save_for_backward``: saved-tensor hooks apply to them, and an
    in-place change of an input since the forward raises torch's own error (as for ``F.linear``, which saves
    them too). The first backward spends the gradients, handed on untracked (``.data``): as they are for the
    usual upstream 1 on the CPU (read on the host), scaled out of place for another; on accelerators scaled in
    place (the upstream not read: no host synchronisation, no second gradient-sized copy). What changes them
    afterwards (an in-place hook, ``.grad``'s sum) concerns no saved tensor then: a second backward through a
    retained graph computes them again by the forward's pass from the saved inputs."""

    @staticmethod
    def forward(
        ctx: Any, h: Any, w: Any, b: Any, t: Any, weight: Any, ce_s: Any, lse_s: Any, opts: Any, xp: Any, call: Any
    ) -> Any:
        need = ctx.needs_input_grad
        grads: tuple[Any, ...] = (None, None, None)
        if any(need[:3]):
            ce, lse, *grads = _ops(call)[1](h, w, b, t, weight, ce_s, lse_s, *opts)
        else:
            ce, lse = _ops(call)[0](h, w, b, t, weight, *opts)
        ctx.save_for_backward(
            *(g if n else None for g, n in zip(grads, need[:3], strict=True)),
            *(h, w, b, t, weight, ce_s, lse_s),
            torch.sum(ce) if need[5] else None,
            torch.sum(lse * lse) / 2 if need[6] else None,
        )
        ctx.call, ctx.opts, ctx.spent = _without_arrays(call), opts, False
        return _linear.scalar_loss(ce, lse, ce_s, lse_s, xp)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        *grads, h, w, b, t, weight, ce_s, lse_s, ce_sum, lse_sq = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the unchunked path, which is differentiable
            return _LinearScalar._differentiated(ctx, g, (h, w, b, t, weight, ce_s, lse_s))
        if ctx.spent:  # a second backward (a retained graph): the forward's pass again
            _, _, *again = _ops(ctx.call)[1](h, w, b, t, weight, ce_s, lse_s, *ctx.opts)
            grads = [None if gr is None else a for gr, a in zip(grads, again, strict=True)]
        ctx.spent = True
        scaled = [None if s is None else _times_upstream(s, g) for s in grads]
        weight_bar = None
        if ctx.needs_input_grad[4]:  # ∂loss/∂weight at a fixed ce_scale; autograd adds the denominator's part
            weight_bar = _ops(ctx.call)[3](h, w, b, t, (g * ce_s).expand(t.shape[0]), *ctx.opts)
        extra = [None if s is None else g * s for s in (ce_sum, lse_sq)]
        return (*scaled, None, weight_bar, *extra, None, None, None)

    @staticmethod
    def _differentiated(ctx: Any, g: torch.Tensor, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        """``create_graph=True``: the gradients through the unchunked path, which is differentiable; ``inputs``
        the saved ``(h, w, b, t, weight, ce_s, lse_s)``."""
        h, w, b, t, weight, ce_s, lse_s = inputs
        wanted = [i for i in (0, 1, 2, 4, 5, 6) if ctx.needs_input_grad[i]]
        with torch.enable_grad():
            call = dataclasses.replace(ctx.call, target=t, weight=weight)
            ce, lse = _unchunked_rows(call, h, w, b)
            loss = _linear.scalar_loss(ce, lse, ce_s, lse_s, call.xp)
            grads = torch.autograd.grad(loss, [inputs[i] for i in wanted], g, create_graph=True, allow_unused=True)
        out: list[Any] = [None] * 11
        for i, gr in zip(wanted, grads, strict=True):
            out[i] = gr
        return tuple(out)


class _LinearRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: Any, w: Any, b: Any, t: Any, weight: Any, opts: Any, call: Any) -> Any:
        ce, lse = _ops(call)[0](h, w, b, t, weight, *opts)
        ctx.save_for_backward(h, w, b, t, weight)
        ctx.opts, ctx.call = opts, _without_arrays(call)
        return ce, lse

    @staticmethod
    def backward(ctx: Any, ce_bar: torch.Tensor, lse_bar: torch.Tensor) -> Any:
        h, w, b, t, weight = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the unchunked path, which is differentiable
            wanted = [i for i in (0, 1, 2, 4) if ctx.needs_input_grad[i]]
            args = dict(enumerate((h, w, b, None, weight)))
            with torch.enable_grad():
                ce, lse = _unchunked_rows(dataclasses.replace(ctx.call, target=t, weight=weight), h, w, b)
                grads = torch.autograd.grad(
                    (ce, lse), [args[i] for i in wanted], (ce_bar, lse_bar), create_graph=True, allow_unused=True
                )
            out: list[Any] = [None] * 7
            for i, gr in zip(wanted, grads, strict=True):
                out[i] = gr
            return tuple(out)
        need = ctx.needs_input_grad
        dh = dw = db = weight_bar = None
        if any(need[:3]):
            dh, dw, db = _ops(ctx.call)[2](h, w, b, t, weight, ce_bar, lse_bar, *ctx.opts)
        if need[4]:
            weight_bar = _ops(ctx.call)[3](h, w, b, t, ce_bar, *ctx.opts)
        return dh, dw, None if b is None else db, None, weight_bar, None, None


def _autocast(h: Any, w: Any, b: Any) -> tuple[Any, Any, Any]:
    """Under autocast, ``h``, ``W`` and ``b`` in the autocast dtype (float64 stays), as ``F.linear`` takes them.

    The casts are recorded by autograd: the gradients come back in the inputs' dtypes.
    """
    device_type = h.device.type
    if not torch.is_autocast_enabled(device_type):
        return h, w, b
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(a if a is None or a.dtype == torch.float64 else a.to(dtype) for a in (h, w, b))  # type: ignore[return-value]


def linear_out_dtype(dtype: torch.dtype, hidden: torch.Tensor) -> torch.dtype:
    """The loss's dtype: the inputs', at least float32 under autocast (as ``F.cross_entropy`` there)."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.promote_types(dtype, torch.float32)
    return dtype


def _without_arrays(call: _linear.LinearCall) -> _linear.LinearCall:
    """``call`` without its arrays, for a node's ``ctx``: those its backward reads are saved tensors (freed with
    the graph's buffers, seen by saved-tensor hooks); a ``ctx`` attribute would hold them as long as the graph."""
    return dataclasses.replace(call, h=None, w=None, b=None, target=None, weight=None)


def _unchunked_rows(call: _linear.LinearCall, h: Any, w: Any, b: Any) -> Any:
    """Under a torch.func transform, or with tensor options: the logits ``h @ W.T + b`` at once, through
    :func:`row_losses`.

    The custom ops that run the chunks have no batching rules and take options as floats; this path
    has torch.func's transforms and differentiates the options (and holds the full logits).
    """
    z = _linear.unchunked_logits(h, w, b, call.xp)
    return row_losses(z, call.target, call.weight, call.opts, call.may_ignore, call.xp, call.shard)


def linear_rows(call: _linear.LinearCall) -> Any:
    h, w, b = _autocast(call.h, call.w, call.b)
    if call.opts.arrays or route(h, w, b, call.target, call.weight) in _TRANSFORMS:
        return _unchunked_rows(call, h, w, b)
    return _LinearRows.apply(h, w, b, call.target, call.weight, _op_opts(call), call)  # type: ignore[no-untyped-call]


def linear_scalar(call: _linear.LinearCall, ce_scale: Any, lse_scale: Any) -> Any:
    h, w, b = _autocast(call.h, call.w, call.b)
    t, weight, xp = call.target, call.weight, call.xp
    if call.opts.arrays or route(h, w, b, t, weight) in _TRANSFORMS:
        ce, lse = _unchunked_rows(call, h, w, b)
        return _linear.scalar_loss(ce, lse, ce_scale, lse_scale, xp)
    return _LinearScalar.apply(h, w, b, t, weight, ce_scale, lse_scale, _op_opts(call), xp, call)  # type: ignore[no-untyped-call]
