"""``multixent.transformers.apply(model)``: a transformers causal LM's loss without its logits.

This module imports transformers and torch (``import multixent`` does not)::

    import multixent.transformers
    model = multixent.transformers.apply(AutoModelForCausalLM.from_pretrained(...))
    loss = model(input_ids, labels=labels).loss  # no (tokens x vocabulary) logits formed
    multixent.transformers.restore(model)        # the model as it was

With ``labels`` (or ``shift_labels``), the patched model's loss is
:func:`multixent.linear_cross_entropy` of the hidden states that enter the output
embeddings (``model.get_output_embeddings()``, an ``nn.Linear``: its weight, tied to the input
embeddings or not, and its bias) and the shifted labels: transformers' ``ForCausalLMLoss``
(the one-token shift, ``ignore_index=-100``, the mean over the counted tokens, or the sum divided
by ``num_items_in_batch`` when the ``Trainer`` passes it under gradient accumulation), with the
configuration's ``final_logit_softcapping`` (Gemma 2) as ``softcap``. The logits are never formed:
the output's ``logits`` is None unless ``apply(model, return_logits=True)``, which computes them
as the model does (only the loss then saves memory). Without labels the model runs unchanged
(``generate()`` included).

How: ``apply`` sets an instance ``forward`` that calls the model's own ``forward`` without the
labels, with a forward pre-hook on the output embeddings that keeps their input and hands them an
empty slice of it; every model whose ``forward`` follows transformers' layout (the decoder, then the
output embeddings once, then ``self.loss_function``) works without a copy of its code.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from dataclasses import dataclass
from typing import Any, cast

import torch
import transformers
from transformers.loss.loss_utils import ForCausalLMLoss

from ._api import linear_cross_entropy

__all__ = ["apply", "restore"]

_STATE = "_multixent_linear_cross_entropy"
_IGNORE = -100
#: configuration attributes that change the logits after the output embeddings (or the loss), which
#: the patched loss would not reproduce; a model whose (text) configuration sets one is refused
_UNSUPPORTED_CONFIG = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier", "logits_soft_cap")


@dataclass(frozen=True)
class _State:
    previous: Any  # the instance attribute ``forward`` replaced (None: the class's)
    signature: inspect.Signature  # the forward's, without ``self``
    softcap: float | None
    return_logits: bool
    chunk_size: int | None


def apply(model: Any, *, return_logits: bool = False, chunk_size: int | None = None) -> Any:
    """Patch ``model`` (in place) so that its loss over ``labels`` never forms the logits; return it.

    ``model`` is a transformers causal language model (``*ForCausalLM``, ``GPT2LMHeadModel``...):
    a ``PreTrainedModel`` whose ``loss_function`` is transformers' ``ForCausalLMLoss`` and whose
    ``get_output_embeddings()`` is an ``nn.Linear``. Others, and configurations that scale the
    logits after the output embeddings (``logit_scale``, ``logits_scaling``...) or add a router's
    auxiliary loss (``output_router_logits``), raise ``TypeError``/``ValueError`` naming the class.

    ``return_logits=True``: with labels, the output keeps its ``logits`` (computed by the model
    as usual; the loss still comes from :func:`multixent.linear_cross_entropy`). ``chunk_size``
    passes to :func:`multixent.linear_cross_entropy`. Applying again replaces the options;
    :func:`restore` undoes it.
    """
    _check(model)
    if not isinstance(return_logits, bool):
        raise TypeError(f"multixent.transformers.apply: return_logits must be a bool; got {return_logits!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"multixent.transformers.apply: chunk_size must be None or an int >= 1; got {chunk_size!r}")
    if _STATE in vars(model):
        restore(model)
    config = model.config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    previous = vars(model).get("forward")
    signature = inspect.signature(previous if previous is not None else model.forward)

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _forward(self, args, kwargs)

    forward.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY), *signature.parameters.values()]
    )
    forward.__doc__ = type(model).forward.__doc__
    object.__setattr__(model, _STATE, _State(previous, signature, softcap, return_logits, chunk_size))
    # a method of the instance (not a closure over it): copy.deepcopy(model) gives a patched copy
    object.__setattr__(model, "forward", types.MethodType(forward, model))
    return model


def restore(model: Any) -> Any:
    """Undo :func:`apply` on ``model`` (in place) and return it; a model not patched is returned as is."""
    state = vars(model).pop(_STATE, None)
    if state is not None:
        del model.forward
        if state.previous is not None:
            object.__setattr__(model, "forward", state.previous)
    return model


def _check(model: Any) -> None:
    name = type(model).__name__
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"multixent.transformers.apply takes a transformers PreTrainedModel; got {name}")
    if getattr(model, "loss_function", None) is not ForCausalLMLoss:
        raise TypeError(
            f"multixent.transformers.apply takes a causal language model (its loss_function transformers' "
            f"ForCausalLMLoss); {name}'s loss is {getattr(model, 'loss_type', None) or 'another'}"
        )
    head = cast(Any, model).get_output_embeddings()  # transformers' methods are untyped
    if not isinstance(head, torch.nn.Linear) or not head.weight.is_floating_point():
        raise TypeError(
            f"multixent.transformers.apply needs output embeddings that are a torch.nn.Linear with a floating "
            f"weight; {name}.get_output_embeddings() is {type(head).__name__}"
        )
    config = model.config.get_text_config()
    for attr in _UNSUPPORTED_CONFIG:
        value = getattr(config, attr, None)
        if value is not None and value != 1:
            raise ValueError(f"multixent.transformers.apply: {name} has config.{attr}={value!r}, not supported")
    if getattr(config, "output_router_logits", False):
        raise ValueError(
            f"multixent.transformers.apply: {name} has config.output_router_logits=True (a router auxiliary "
            f"loss added to the loss), not supported"
        )


def _forward(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    state: _State = vars(model)[_STATE]
    inner = state.previous if state.previous is not None else type(model).forward.__get__(model)
    named = _named(state.signature, type(model).__name__, args, kwargs)
    if named.get("labels") is None and named.get("shift_labels") is None:
        return inner(*args, **kwargs)
    labels, shift_labels = named.pop("labels", None), named.pop("shift_labels", None)
    head = model.get_output_embeddings()
    out, hidden = _run_keeping_hidden(inner, named, head, state.return_logits, type(model).__name__)
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=_IGNORE)[..., 1:]
    loss = _loss(hidden, head, shift_labels, named.get("num_items_in_batch"), state, type(model).__name__)
    if isinstance(out, tuple):  # return_dict=False: (logits, ...) without a loss
        return (loss, *(out if state.return_logits else out[1:]))
    return dataclasses.replace(out, loss=loss, logits=out.logits if state.return_logits else None)


def _named(signature: inspect.Signature, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name (the positional ones named by the forward's signature)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p.name for p in signature.parameters.values() if p.kind in kinds]
    if len(args) > len(positional):
        raise TypeError(f"{name}.forward takes at most {len(positional)} positional arguments; got {len(args)}")
    return {**dict(zip(positional, args, strict=False)), **kwargs}


def _run_keeping_hidden(
    inner: Any, named: dict[str, Any], head: torch.nn.Module, return_logits: bool, name: str
) -> tuple[Any, torch.Tensor]:
    """The model's own forward (without labels) and the input of its output embeddings, which get an
    empty slice of it (no logits) unless ``return_logits``."""
    seen: list[torch.Tensor] = []

    def keep_input(module: Any, inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
        seen.append(inputs[0])
        return None if return_logits else (inputs[0][..., :0, :], *inputs[1:])

    handle = head.register_forward_pre_hook(keep_input)
    try:
        out = inner(**named)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise TypeError(
            f"multixent.transformers: {name}.forward called its output embeddings {len(seen)} times (expected "
            f"once, on the last hidden states); this model is not supported"
        )
    if getattr(out, "aux_loss", None) is not None:
        raise ValueError(f"multixent.transformers: {name} returned an auxiliary (router) loss, not supported")
    return out, seen[0]


def _loss(hidden: torch.Tensor, head: Any, shift_labels: torch.Tensor, count: Any, state: _State, name: str) -> Any:
    """transformers' ``ForCausalLMLoss`` through ``linear_cross_entropy``: the mean over the counted
    tokens, or their sum divided by ``num_items_in_batch``; float32."""
    target = shift_labels.reshape(-1).to(hidden.device)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if hidden.dtype in (torch.float16, torch.bfloat16):
        hidden = hidden.float()  # a float32 loss, as transformers' (the classifier is upcast once inside)
    if hidden.shape[0] != target.shape[0]:
        raise ValueError(
            f"multixent.transformers: {name}: {target.shape[0]} shifted labels for {hidden.shape[0]} hidden "
            f"states (with logits_to_keep, pass shift_labels of the kept positions)"
        )
    loss = linear_cross_entropy(
        hidden,
        head.weight,
        target,
        bias=head.bias,
        softcap=state.softcap,
        ignore_index=_IGNORE,
        reduction="mean" if count is None else "sum",
        chunk_size=state.chunk_size,
    ).float()
    if count is not None:
        loss = loss / (count.to(loss.device) if torch.is_tensor(count) else count)
    return loss
