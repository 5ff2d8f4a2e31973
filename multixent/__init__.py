"""multixent: one cross-entropy loss for NumPy, PyTorch, JAX and any array-API library."""

from ._api import (
    cross_entropy,
    cross_entropy_and_grad,
    linear_cross_entropy,
    log_softmax,
    logsumexp,
    nll_loss,
)

__all__ = ["cross_entropy", "cross_entropy_and_grad", "linear_cross_entropy", "log_softmax", "logsumexp", "nll_loss"]
__version__ = "0.1.0"
