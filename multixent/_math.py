"""Transition shim: the names other modules take from here (being moved to _formulas and _rows)."""

from __future__ import annotations

from ._blocked import BLOCK_ELEMENTS, block_rows_for
from ._formulas import (
    Options,
    Shard,
    class_targets,
    compute_dtype,
    gather_rows,
    log_softmax,
    logsumexp,
    prepare_logits,
)
from ._formulas import may_be_nonzero as is_set
from ._rows import (
    Plan,
    eager_plan,
    row_losses,
    row_losses_and_grad,
    row_losses_jvp,
    row_losses_vjp,
    row_losses_weight_vjp,
)

__all__ = [
    "BLOCK_ELEMENTS",
    "Options",
    "Plan",
    "Shard",
    "block_rows_for",
    "class_targets",
    "compute_dtype",
    "eager_plan",
    "gather_rows",
    "is_set",
    "log_softmax",
    "logsumexp",
    "prepare_logits",
    "row_losses",
    "row_losses_and_grad",
    "row_losses_jvp",
    "row_losses_vjp",
    "row_losses_weight_vjp",
]
