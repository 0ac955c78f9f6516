import math

import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import losses


def test_bits_per_byte_golden_value():
    # Two positions over a 2-token vocabulary; p = softmax([0, ln 3]) = (1/4, 3/4).
    logits = jnp.log(jnp.array([[[1.0, 3.0], [1.0, 3.0], [1.0, 3.0]]]))
    batch = {"targets": jnp.array([[1, 0, 0]]), "weights": jnp.array([[1.0, 1.0, 0.0]]),
             "target_bytes": jnp.array([[2, 3, 7]])}  # the third position is padding
    sums = losses.lm_sums(logits, batch)
    nats = -math.log(0.75) - math.log(0.25)
    assert float(sums["nats"]) == pytest.approx(nats, rel=1e-6)
    assert float(sums["tokens"]) == 2 and float(sums["bytes"]) == 5
    rates = losses.compression(sums)
    assert float(rates["bits_per_token"]) == pytest.approx(nats / math.log(2) / 2, rel=1e-6)  # 1.2075 bits
    assert float(rates["bits_per_byte"]) == pytest.approx(nats / math.log(2) / 5, rel=1e-6)   # 0.4830 bits


def test_uniform_prediction_costs_log2_vocab_bits_per_token():
    logits = jnp.zeros((2, 5, 256))
    targets = jnp.arange(10).reshape(2, 5)
    batch = {"targets": targets, "weights": jnp.ones((2, 5)), "target_bytes": jnp.ones((2, 5), jnp.int32)}
    rates = losses.compression(losses.lm_sums(logits, batch))
    np.testing.assert_allclose(rates["bits_per_token"], 8.0, rtol=1e-6)  # a byte-level uniform model: 8 bits
    np.testing.assert_allclose(rates["bits_per_byte"], 8.0, rtol=1e-6)
