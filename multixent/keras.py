"""``multixent.keras.CrossEntropy``: :func:`multixent.cross_entropy` as a Keras 3 loss.

This module imports keras (``import multixent`` does not). It works on the Keras backends
whose tensors multixent takes: JAX and torch (and NumPy)::

    from multixent.keras import CrossEntropy
    model.compile(optimizer="adam", loss=CrossEntropy())              # integer labels, as
    #                                                      SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer="adam", loss=CrossEntropy(sparse=False))  # one-hot / probabilities, as
    #                                                      CategoricalCrossentropy(from_logits=True)
"""

from __future__ import annotations

from typing import Any

import keras

from ._api import cross_entropy

try:  # how Keras's own losses mark entries their reductions leave out (ignore_class); no public name
    from keras.src.backend import set_keras_mask
except ImportError:  # Keras 3 releases without it read this attribute

    def set_keras_mask(x: Any, mask: Any) -> None:
        x._keras_mask = mask


__all__ = ["CrossEntropy"]

#: The label that is ignored (:func:`multixent.cross_entropy`'s default ``ignore_index``).
_IGNORE = -100


def _check_labels(true: tuple[Any, ...], pred: tuple[Any, ...], axis: int) -> None:
    """ValueError for ``sparse=True`` labels of the logits' shape with more than one class (one-hot rows)."""
    a = axis % len(pred)
    if true[a] is not None and true[a] != 1:
        raise ValueError(
            f"multixent.keras.CrossEntropy(sparse=True) takes class indices, y_true of shape {pred[:a] + pred[a + 1 :]}"
            f" (or with a class axis of size 1); got y_true of shape {true}, like y_pred's {pred}: one-hot rows or "
            "class probabilities? Use CrossEntropy(sparse=False)"
        )


@keras.saving.register_keras_serializable(package="multixent")
class CrossEntropy(keras.losses.Loss):
    """Cross-entropy of logits ``y_pred`` against ``y_true``, in Keras's ``(y_true, y_pred)`` order.

    ``y_pred`` are logits (Keras's ``from_logits=True``), classes on ``axis`` (default last).
    ``sparse=True``: ``y_true`` holds class indices (Keras passes them as floats; they are
    cast back to integers), of ``y_pred``'s shape without the class axis or with a class axis
    of size 1 (Keras's ``(N, 1)`` labels). ``sparse=False``: ``y_true`` holds one-hot rows or
    class probabilities, of ``y_pred``'s shape. ``label_smoothing``, ``z_loss`` and ``softcap``
    are :func:`multixent.cross_entropy`'s. ``sample_weight`` and ``reduction`` (Keras's:
    ``"sum_over_batch_size"``, ``"sum"``, ``"mean"``, ``"mean_with_sample_weight"``, ``None``)
    are applied by Keras to the per-example losses. A label of -100 is ignored: its loss is 0
    and it is masked out, so it counts in no denominator (``"sum_over_batch_size"`` divides by
    the labels not ignored, ``"mean_with_sample_weight"`` by their weights), as Keras's
    ``SparseCategoricalCrossentropy(ignore_class=-100)``. One-hot ``y_true`` with ``sparse=True``
    is refused (ValueError: use ``sparse=False``).
    """

    def __init__(
        self,
        sparse: bool = True,
        *,
        axis: int = -1,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        reduction: str | None = "sum_over_batch_size",
        name: str = "multixent_cross_entropy",
        dtype: Any = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.sparse = sparse
        self.axis = axis
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap

    def call(self, y_true: Any, y_pred: Any) -> Any:
        if self.sparse:
            if len(y_true.shape) == len(y_pred.shape):  # (N, 1) labels: drop the size-1 class axis
                _check_labels(tuple(y_true.shape), tuple(y_pred.shape), self.axis)
                y_true = keras.ops.squeeze(y_true, axis=self.axis)
            y_true = keras.ops.cast(y_true, "int32")
        losses = cross_entropy(
            y_pred,
            y_true,
            axis=self.axis,
            reduction="none",
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
        )
        if self.sparse:  # ignored labels: masked out, so Keras's reductions count them out of their denominators
            set_keras_mask(losses, keras.ops.not_equal(y_true, _IGNORE))
        return losses

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "sparse": self.sparse,
            "axis": self.axis,
            "label_smoothing": self.label_smoothing,
            "z_loss": self.z_loss,
            "softcap": self.softcap,
        }
