"""A small Flax NNX language model with tied embeddings, trained with ``multixent.linear_cross_entropy``.

The loss takes the last hidden states and the (tied) embedding matrix: the ``(tokens, vocabulary)``
logits are never formed, under ``jax.jit`` and its gradient alike. ``full_logits_loss`` is the same
model's loss over its full logits (optax), for comparison.

Run it: ``python examples/flax_lm.py`` (a few training steps on random tokens, then both losses'
compiled temporary memory).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import multixent


class Block(nnx.Module):
    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        causal = nnx.make_causal_mask(jnp.ones(x.shape[:2], dtype=jnp.int32))
        x = x + self.attention(self.norm1(x), mask=causal)
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class LanguageModel(nnx.Module):
    """Token embeddings, ``layers`` blocks, a final norm; the output layer is the embedding (tied)."""

    def __init__(self, vocab: int, width: int, layers: int = 2, heads: int = 2, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1024, width), jnp.float32))
        self.blocks = nnx.List([Block(width, heads, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(width, rngs=rngs)

    def hidden(self, tokens: jax.Array) -> jax.Array:
        """The last hidden states ``(batch, length, width)``."""
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """The logits ``(batch, length, vocab)``, for generation."""
        return self.embed.attend(self.hidden(tokens))


#: rows of logits formed at once (the default, ``2**23 // vocab`` rows, would take all 1024 rows at once here)
CHUNK = 128


def linear_loss(model: LanguageModel, tokens: jax.Array) -> jax.Array:
    """Next-token cross-entropy without the logits: hidden states and the tied embedding matrix."""
    hidden = model.hidden(tokens[:, :-1])
    return multixent.linear_cross_entropy(hidden, model.embed.embedding[...], tokens[:, 1:], chunk_size=CHUNK)


def full_logits_loss(model: LanguageModel, tokens: jax.Array) -> jax.Array:
    """The same loss over the full logits (optax)."""
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@nnx.jit(static_argnums=3)
def train_step(model: LanguageModel, optimizer: nnx.Optimizer, tokens: jax.Array, loss_fn=linear_loss) -> jax.Array:
    """One AdamW step (in place on ``model`` and ``optimizer``); returns the loss."""
    loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
    optimizer.update(model, grads)
    return loss


def temp_bytes(loss_fn, model: LanguageModel, tokens: jax.Array) -> int:
    """The temporary bytes XLA allocates for ``jax.jit(jax.value_and_grad(loss))`` of the model's parameters."""
    graphdef, params = nnx.split(model)

    def pure(params, tokens):
        return loss_fn(nnx.merge(graphdef, params), tokens)

    compiled = jax.jit(jax.value_and_grad(pure)).lower(params, tokens).compile()
    return compiled.memory_analysis().temp_size_in_bytes


if __name__ == "__main__":
    vocab, width, batch, length = 8192, 64, 8, 129  # 8 x 128 predicted tokens
    model = LanguageModel(vocab, width, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    tokens = jax.random.randint(jax.random.key(1), (batch, length), 0, vocab)
    for step in range(3):
        print(f"step {step}: loss {float(train_step(model, optimizer, tokens)):.4f}")
    linear, full = temp_bytes(linear_loss, model, tokens), temp_bytes(full_logits_loss, model, tokens)
    print(f"jit value_and_grad temporary memory: linear {linear / 2**20:.1f} MiB, full logits {full / 2**20:.1f} MiB")
