"""``multixent.torch.CrossEntropyLoss``: a drop-in for ``torch.nn.CrossEntropyLoss``.

This module imports torch (``import multixent`` does not); import it where you would
use ``torch.nn``::

    from multixent.torch import CrossEntropyLoss
    loss_fn = CrossEntropyLoss(weight=w, ignore_index=-100, label_smoothing=0.1, z_loss=1e-4)
    loss = loss_fn(logits, target)  # logits (N, C, d1, ...) as for torch's module
"""

from __future__ import annotations

from typing import Any

import torch

from ._api import cross_entropy

__all__ = ["CrossEntropyLoss"]


class CrossEntropyLoss(torch.nn.Module):
    """:func:`multixent.cross_entropy` as a module, with ``torch.nn.CrossEntropyLoss``'s arguments.

    ``weight`` is a buffer: it moves with ``.to()`` and is saved in ``state_dict``.
    The class axis is ``axis=1`` by default, torch's ``(N, C, d1, ...)`` layout (a ``(C,)``
    input uses its one axis); pass ``axis=-1`` for ``(B, T, V)`` logits. ``z_loss`` and
    ``softcap`` are multixent's options. ``size_average`` and ``reduce``, deprecated in
    torch since 0.4, are refused: use ``reduction``.
    """

    weight: torch.Tensor | None

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average: Any = None,
        ignore_index: int = -100,
        reduce: Any = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        axis: int = 1,
    ) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            raise ValueError(
                "multixent.torch.CrossEntropyLoss: size_average and reduce (deprecated in torch) are not "
                f"supported; got size_average={size_average!r}, reduce={reduce!r}; use reduction='mean'|'sum'|'none'"
            )
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.axis = axis

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(
            input,
            target,
            axis=0 if input.ndim == 1 else self.axis,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
            f"z_loss={self.z_loss}, softcap={self.softcap}, axis={self.axis}"
        )
