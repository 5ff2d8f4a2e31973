"""``examples/flax_lm.py``: the Flax NNX language model's loss through ``linear_cross_entropy`` equals
its full-logits loss (optax) in value and gradients, trains under ``jax.jit``, and its compiled
``value_and_grad`` holds at most 0.3x the full-logits version's temporary memory."""

from __future__ import annotations

import numpy as np
import pytest
from _paths import load_script
from conftest import SELECTED

pytestmark = pytest.mark.skipif("jax" not in SELECTED, reason="the jax backend is not selected")
pytest.importorskip("flax.nnx")
pytest.importorskip("optax")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

flax_lm = load_script("examples/flax_lm.py", "flax_lm")


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _tokens(seed: int, vocab: int, shape=(4, 33)):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def test_value_and_gradients_equal_the_full_logits_model():
    vocab = 512
    model = flax_lm.LanguageModel(vocab, 32, layers=1, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = _tokens(1, vocab)

    def grad_of(loss_fn):
        return jax.jit(jax.value_and_grad(lambda p, t: loss_fn(nnx.merge(graphdef, p), t)))(params, tokens)

    (value, grads), (expected, expected_grads) = grad_of(flax_lm.linear_loss), grad_of(flax_lm.full_logits_loss)
    assert value.dtype == np.float32
    assert _relative(value, expected) <= 1e-5
    leaves, expected_leaves = jax.tree.leaves_with_path(grads), jax.tree.leaves(expected_grads)
    assert len(leaves) == len(expected_leaves) > 10
    for (path, g), e in zip(leaves, expected_leaves, strict=True):
        assert _relative(g, e) <= 1e-5, jax.tree_util.keystr(path)


def test_jit_training_steps_give_the_full_logits_losses():
    vocab = 512
    models = [flax_lm.LanguageModel(vocab, 32, layers=1, rngs=nnx.Rngs(0)) for _ in range(2)]
    import optax

    optimizers = [nnx.Optimizer(m, optax.adamw(1e-3), wrt=nnx.Param) for m in models]
    losses = []
    for model, optimizer, loss_fn in zip(
        models, optimizers, (flax_lm.linear_loss, flax_lm.full_logits_loss), strict=True
    ):
        losses.append([float(flax_lm.train_step(model, optimizer, _tokens(1, vocab), loss_fn)) for _ in range(3)])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    assert losses[0][2] < losses[0][0]


def test_jit_value_and_grad_holds_under_a_third_of_the_full_logits_memory():
    # 8 x 128 predicted tokens, vocabulary 8192, width 64: the logits (32 MiB) dominate the model's own
    model = flax_lm.LanguageModel(8192, 64, layers=1, rngs=nnx.Rngs(0))
    tokens = _tokens(1, 8192, (8, 129))
    linear = flax_lm.temp_bytes(flax_lm.linear_loss, model, tokens)
    full = flax_lm.temp_bytes(flax_lm.full_logits_loss, model, tokens)
    assert full >= 8 * 128 * 8192 * 4  # at least the logits
    assert linear <= 0.3 * full, (linear, full)
