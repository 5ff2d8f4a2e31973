"""The adapter contract (:class:`Adapter`) and :func:`adapter_for`: the one place that tells frameworks apart.

An adapter is a module (``generic``, ``torch``, ``jax``) wrapping the math of
:mod:`multixent._rows` and :mod:`multixent._linear` in its framework's
execution plan and autodiff; mypy checks each against :class:`Adapter`.
Framework modules are imported only when such an array arrives:
array-api-compat recognises torch and JAX arrays without importing them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

import array_api_compat

from .. import _compat, _formulas, _linear, _rows
from . import generic


class Adapter(Protocol):
    """What every adapter module supplies."""

    #: NumPy arrays (and Python numbers) passed beside this framework's arrays: True, converted to
    #: it (its own functions take them, as ``jnp``'s do); else a string naming the conversion that
    #: the TypeError suggests, or False.
    NUMPY_INPUTS: bool | str

    def scalar(self, a: Any) -> float | None:
        """A 0-d array option's value as a Python float; None while traced or differentiated (it stays an array)."""
        ...

    def quiet(self) -> AbstractContextManager[Any]:
        """A context without floating-point warnings."""
        ...

    def concrete(self, a: Any, in_group: bool = False) -> Any:
        """``a`` (or a host copy of it) when its values can be read now; None while traced. ``in_group``: a
        call over a process group, whose members agree on the host anyway: read on an accelerator too."""
        ...

    def plan(
        self, x: Any, *inputs: Any, may_ignore: bool, differentiable: bool = False, shard: Any = None
    ) -> _rows.Plan:
        """How the math runs on ``(rows, C)`` logits ``x``: blocks, in place, stop-gradient.

        ``inputs`` are the call's other arrays; ``differentiable``: the math itself is differentiated.
        """
        ...

    def row_losses(
        self,
        x: Any,
        target: Any,
        weight: Any,
        opts: _formulas.Options,
        may_ignore: bool,
        xp: Any,
        shard: Any = None,
        need_lse: bool = True,
    ) -> tuple[Any, Any]:
        """Per-row ``(ce, lse)`` of :func:`multixent._rows.row_losses`, differentiable by the framework.

        ``shard``: the class axis split over a group (:class:`multixent._formulas.Shard`), or None.
        ``need_lse=False``: the caller does not use ``lse``, which may then be None.
        """
        ...

    def fused(self, x: Any, target: Any, weight: Any, loss: Callable[..., Any]) -> Any:
        """A scalar loss whose gradient with respect to ``x`` was computed with it, or None (the usual route).

        ``loss(x, True)`` gives ``(loss, ∂loss/∂x)`` in one pass; ``loss(z)`` the loss at the logits ``z``
        through the usual, differentiable route (for a second or a double backward). Used where autograd
        records ``x`` alone, eagerly and in one block: the backward then only scales the gradient.
        """
        ...

    def linear_rows(self, call: _linear.LinearCall) -> tuple[Any, Any]:
        """Per-row ``(ce, lse)`` of ``h @ W.T + b`` (:func:`multixent._linear.rows`), differentiable."""
        ...

    def linear_scalar(self, call: _linear.LinearCall, ce_scale: Any, lse_scale: Any) -> Any:
        """The "mean"/"sum" loss :func:`multixent._linear.scalar_loss`, differentiable."""
        ...

    def linear_out_dtype(self, dtype: Any, hidden: Any) -> Any:
        """The dtype of ``linear_cross_entropy``'s loss for inputs of ``dtype``."""
        ...


if TYPE_CHECKING:  # mypy checks every adapter module against the contract
    from . import jax as _jax_adapter
    from . import torch as _torch_adapter

    _GENERIC: Adapter = generic
    _TORCH: Adapter = _torch_adapter
    _JAX: Adapter = _jax_adapter


def shard_for(
    group: Any,
    class_offset: Any,
    num_local: int,
    arrays: tuple[Any, ...],
    error: BaseException | None = None,
    agreed: tuple[tuple[str, Any], ...] = (),
) -> _formulas.Shard | None:
    """The :class:`multixent._formulas.Shard` of ``group`` (None without one): ``num_local`` classes here.

    A str or tuple of str is a JAX mesh axis (inside ``jax.shard_map``), a torch
    ``ProcessGroup`` a torch group (``_checks.group`` checked which); ``arrays`` (the call's,
    None skipped) must be that framework's. ``error``: this member's arguments failed a check;
    it is raised here on every member (torch: through the same all-gather the others make).
    ``agreed``: ``(name, value)`` pairs that must be equal on every member (torch: exchanged in
    that all-gather; JAX: every device traces the same program, so they are).
    """
    if group is None:
        return None
    if isinstance(group, (str, tuple)):
        from . import jax

        if error is not None:  # every device traces the same program: raised alike
            raise error
        return jax.shard(group, class_offset, num_local, arrays)
    from . import torch

    return torch.shard(group, class_offset, num_local, arrays, error, agreed)


def check_group(group: Any, *arrays_and_options: Any) -> None:
    """NotImplementedError where this framework cannot split the class axis over ``group`` for this call
    (``arrays_and_options``: ``(logits, target, weight, opts)``); checked before the agreement."""
    if type(group).__module__.startswith("torch"):  # a torch ProcessGroup (checked before: or a mesh axis)
        from . import torch

        torch.refuse_group(*arrays_and_options)


def dtensor_adapter(*arrays: Any) -> Any:
    """The DTensor adapter (:mod:`.dtensor`) when one of ``arrays`` is a torch DTensor, else None
    (imports nothing then)."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None or not any(isinstance(a, module.DTensor) for a in arrays):
        return None
    from . import dtensor

    return dtensor


#: :func:`adapter_for`'s answer per array type (it reads the type only).
_ADAPTERS: _compat.Memo[Adapter] = _compat.Memo()


def adapter_for(x: Any) -> Adapter:
    """The adapter module of ``x``'s framework (kept per type)."""
    return _ADAPTERS(type(x), lambda: _adapter_for(x))


def _adapter_for(x: Any) -> Adapter:
    if _compat.is_torch_array(x):
        from . import torch

        return torch
    if array_api_compat.is_jax_array(x):
        from . import jax

        return jax
    return generic
