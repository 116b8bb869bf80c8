"""A small character-level transformer for the spike experiment, in plain JAX.

The text is the source of a few modules of Python's standard library (always
present, nothing to download), read as ASCII bytes (vocabulary 128). The model
is a pre-LayerNorm decoder: token and position embeddings, ``layers`` blocks of
causal multi-head attention and a GELU MLP, a final LayerNorm and an output
projection.
"""

from __future__ import annotations

import argparse
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

VOCAB = 128


@dataclass(frozen=True)
class Model:
    d_model: int = 64
    heads: int = 4
    layers: int = 2
    seq_len: int = 64


def corpus() -> np.ndarray:
    """The training text as int32 byte values below 128."""
    text = "".join(inspect.getsource(m) for m in (argparse, inspect, textwrap))
    data = np.frombuffer(text.encode("ascii", "replace"), np.uint8).astype(np.int32)
    return np.minimum(data, VOCAB - 1)


def unigram_entropy() -> float:
    """The loss of predicting each character by its frequency alone, in nats."""
    counts = np.bincount(corpus(), minlength=VOCAB)
    freq = counts[counts > 0] / counts.sum()
    return float(-np.sum(freq * np.log(freq)))


def init(key: jax.Array, model: Model) -> dict[str, Any]:
    d = model.d_model
    keys = iter(jax.random.split(key, 3 + 4 * model.layers))

    def dense(shape: tuple[int, int]) -> jax.Array:
        return jax.random.normal(next(keys), shape) / np.sqrt(shape[0])

    blocks = []
    for _ in range(model.layers):
        blocks.append(
            {
                "ln1": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
                "qkv": dense((d, 3 * d)),
                "proj": dense((d, d)),
                "ln2": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
                "up": dense((d, 4 * d)),
                "down": dense((4 * d, d)),
            }
        )
    return {
        "tokens": jax.random.normal(next(keys), (VOCAB, d)) * 0.02,
        "positions": jax.random.normal(next(keys), (model.seq_len, d)) * 0.02,
        "blocks": blocks,
        "ln_f": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
        "out": dense((d, VOCAB)),
    }


def _layer_norm(x: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def logits(params: dict[str, Any], tokens: jax.Array, model: Model) -> jax.Array:
    """``tokens``: int[batch, seq] -> float[batch, seq, VOCAB]."""
    b, t = tokens.shape
    h, d = model.heads, model.d_model
    x = params["tokens"][tokens] + params["positions"][:t]
    mask = jnp.tril(jnp.ones((t, t), bool))
    for block in params["blocks"]:
        q, k, v = jnp.split(_layer_norm(x, block["ln1"]) @ block["qkv"], 3, axis=-1)
        q, k, v = (a.reshape(b, t, h, d // h) for a in (q, k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // h)
        weights = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
        x = x + attended @ block["proj"]
        x = x + jax.nn.gelu(_layer_norm(x, block["ln2"]) @ block["up"]) @ block["down"]
    return _layer_norm(x, params["ln_f"]) @ params["out"]


def loss(params: dict[str, Any], tokens: jax.Array, model: Model) -> jax.Array:
    """Mean next-character cross-entropy; ``tokens`` holds ``seq_len + 1`` characters."""
    out = logits(params, tokens[:, :-1], model)
    target = tokens[:, 1:]
    log_p = jax.nn.log_softmax(out, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_p, target[..., None], axis=-1))


def batch(key: jax.Array, data: jax.Array, size: int, model: Model) -> jax.Array:
    """``size`` random windows of ``seq_len + 1`` characters."""
    starts = jax.random.randint(key, (size,), 0, data.shape[0] - model.seq_len - 1)
    return jax.vmap(lambda s: jax.lax.dynamic_slice(data, (s,), (model.seq_len + 1,)))(starts)
