import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llm_jax.config import Config, llama
from llm_jax.data.batches import TokenBatch
from llm_jax.model import Transformer
from llm_jax.tasks import losses
from llm_jax.tasks.pretrain import Pretrain


def scored(targets, weights, target_bytes):
    """The entries of a TokenBatch that the loss reads once the logits are given."""
    return TokenBatch(inputs=None, targets=targets, segment_ids=None, positions=None, weights=weights,
                      target_bytes=target_bytes)


def test_bits_per_byte_golden_value():
    # Two positions over a 2-token vocabulary; p = softmax([0, ln 3]) = (1/4, 3/4).
    logits = jnp.log(jnp.array([[[1.0, 3.0], [1.0, 3.0], [1.0, 3.0]]]))
    batch = scored(jnp.array([[1, 0, 0]]), jnp.array([[1.0, 1.0, 0.0]]),
                   jnp.array([[2, 3, 7]]))  # the third position is padding
    sums = losses.weighted_sums(losses.token_nats(logits, batch.targets), batch)
    nats = -math.log(0.75) - math.log(0.25)
    assert float(sums["nats"]) == pytest.approx(nats, rel=1e-6)
    assert float(sums["tokens"]) == 2 and float(sums["bytes"]) == 5
    rates = losses.compression_rates(sums)
    assert float(rates["bits_per_token"]) == pytest.approx(nats / math.log(2) / 2, rel=1e-6)  # 1.2075 bits
    assert float(rates["bits_per_byte"]) == pytest.approx(nats / math.log(2) / 5, rel=1e-6)   # 0.4830 bits


def test_uniform_prediction_costs_log2_vocab_bits_per_token():
    logits = jnp.zeros((2, 5, 256))
    targets = jnp.arange(10).reshape(2, 5)
    batch = scored(targets, jnp.ones((2, 5)), jnp.ones((2, 5), jnp.int32))
    rates = losses.compression_rates(losses.weighted_sums(losses.token_nats(logits, targets), batch))
    np.testing.assert_allclose(rates["bits_per_token"], 8.0, rtol=1e-6)  # a byte-level uniform model: 8 bits
    np.testing.assert_allclose(rates["bits_per_byte"], 8.0, rtol=1e-6)


@pytest.mark.parametrize("shape", [pytest.param(dict(tie_embeddings=False, use_bias=True), marks=pytest.mark.slow),
                                   dict(tie_embeddings=True)], ids=["untied+bias", "tied"])
def test_vocabulary_chunked_loss_equals_the_plain_one_in_value_and_gradient(shape):
    cfg = llama(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, compute_dtype="float32",
                **shape)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (3, 17)).astype(np.int32)
    batch = TokenBatch(inputs=tokens[:, :-1], targets=tokens[:, 1:], positions=np.tile(np.arange(16), (3, 1)),
                       segment_ids=np.ones((3, 16), np.int32), weights=(rng.random((3, 16)) < 0.8).astype(np.float32),
                       target_bytes=rng.integers(1, 4, (3, 16)).astype(np.int32))
    params = nn.unbox(Transformer(cfg).init(jax.random.key(0), *(jnp.ones((1, 4), jnp.int32),) * 3))["params"]

    def nats_and_grads(chunk):
        model = Transformer(dataclasses.replace(cfg, logits_chunk=chunk))
        return jax.value_and_grad(lambda p: Pretrain(Config()).sums(model, p, batch, {})["nats"])(params)

    plain, plain_grads = nats_and_grads(0)
    chunked, chunked_grads = nats_and_grads(16)
    np.testing.assert_allclose(chunked, plain, rtol=1e-5)
    for path, g in jax.tree_util.tree_leaves_with_path(plain_grads):
        other = dict(jax.tree_util.tree_leaves_with_path(chunked_grads))[path]
        np.testing.assert_allclose(other, g, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
