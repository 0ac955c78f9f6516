"""The decoder-only transformer: embeddings, a stack of pre-norm blocks (optionally scanned), and a head:
next-token logits (a language model) or one scalar per sequence (a reward model).

Shape letters (the one legend, used in model/, tasks/ and data/): B batch rows, T tokens of a row, S keys
(cached tokens), D d_model, N query heads, K kv heads, G query heads per kv head (N / K), H head dim,
F d_ff, V vocabulary, C vocabulary chunks of U entries (V = C·U), M microbatches, P preference pairs;
a literal 2 is chosen|rejected.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from llm_jax.config import ModelConfig, PeftConfig
from llm_jax.model import adapters
from llm_jax.model.attention import Attention
from llm_jax.model.dropout import dropout
from llm_jax.model.layers import MLP, Dense, compute_dtype, norm, param_dtype, softcap

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nn.Module):
    """A pre-norm block. Its carry is (residual stream, virtual stream): prompt tuning's virtual tokens (1, V, D)
    pass through the same weights beside the real ones, which see their keys and values (None otherwise)."""
    cfg: ModelConfig
    decode: bool = False
    peft: PeftConfig = PeftConfig()

    @nn.compact
    def __call__(self, carry, positions_BxT, segment_ids_BxT):
        x_BxTxD, virtual_1xVxD = carry
        attn = Attention(self.cfg, self.decode, self.peft, name="attn")
        attn_norm, mlp_norm = norm(self.cfg, "attn_norm"), norm(self.cfg, "mlp_norm")
        mlp = MLP(self.cfg, self.peft, name="mlp")
        virtual_kv = None
        if virtual_1xVxD is not None:  # the virtual tokens attend among themselves, causally
            ones_1xV = jnp.ones(virtual_1xVxD.shape[:2], jnp.int32)
            out_1xVxD, virtual_kv = attn(attn_norm(virtual_1xVxD), jnp.cumsum(ones_1xV, axis=1) - 1, ones_1xV,
                                         use_cache=False, return_kv=True)
            virtual_1xVxD = virtual_1xVxD + out_1xVxD
            virtual_1xVxD = virtual_1xVxD + mlp(mlp_norm(virtual_1xVxD))
        rate = self.cfg.dropout
        x_BxTxD = x_BxTxD + dropout(self, attn(attn_norm(x_BxTxD), positions_BxT, segment_ids_BxT, virtual_kv), rate)
        x_BxTxD = x_BxTxD + dropout(self, mlp(mlp_norm(x_BxTxD)), rate)
        x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "act_embed"))
        return (x_BxTxD, virtual_1xVxD), None  # (carry, output) so the same block works under nn.scan


def block_stack(cfg: ModelConfig, decode: bool, peft: PeftConfig):
    block = Block
    if cfg.remat != "none" and not decode:  # decoding has no backward pass to save memory for
        block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if not cfg.scan_layers:
        return [block(cfg, decode, peft, name=f"layer_{i}") for i in range(cfg.n_layers)]
    scanned = nn.scan(block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=cfg.n_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return [scanned(cfg, decode, peft, name="layers")]


HEADS = ("lm", "reward", "value")


class Transformer(nn.Module):
    """tokens, positions, segment ids (B, T) -> next-token logits (B, T, V) in float32; with
    head="reward", one reward per sequence (B,) in float32 instead (see reward_head); with head="value", one
    value per position (B, T) in float32 (PPO's value model, see PolicyAndValue); with return_hidden, the final-norm hidden states (B, T, D) that the output layer would read.

    The task decides the head (tasks/); with decode=True the attention layers keep a KV cache (see
    attention.py), with the same parameters.
    """
    cfg: ModelConfig
    head: str = "lm"
    decode: bool = False
    peft: PeftConfig = PeftConfig()  # adapters (model/adapters.py); none by default

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT, segment_ids_BxT, return_hidden: bool = False):
        cfg = self.cfg
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=compute_dtype(cfg), param_dtype=param_dtype(cfg),
                         embedding_init=nn.with_logical_partitioning(
                             nn.initializers.normal(cfg.init_std), ("vocab", "embed")), name="embed")
        x_BxTxD = embed(tokens_BxT)
        if cfg.position == "learned":
            x_BxTxD = x_BxTxD + nn.Embed(
                cfg.max_seq_len, cfg.d_model, dtype=compute_dtype(cfg), param_dtype=param_dtype(cfg),
                embedding_init=nn.with_logical_partitioning(
                    nn.initializers.normal(cfg.init_std), ("positions", "embed")), name="pos_embed")(positions_BxT)
        x_BxTxD = nn.with_logical_constraint(dropout(self, x_BxTxD, cfg.dropout), ("batch", "length", "act_embed"))
        carry = (x_BxTxD, self._virtual_tokens())
        for layer in block_stack(cfg, self.decode, self.peft):
            carry, _ = layer(carry, positions_BxT, segment_ids_BxT)
        x_BxTxD = carry[0]
        x_BxTxD = norm(cfg, "final_norm")(x_BxTxD)
        if self.head not in HEADS:
            raise ValueError(f"head {self.head!r} is not one of {', '.join(HEADS)}")
        if self.head == "reward":
            return reward_head(cfg, x_BxTxD, segment_ids_BxT)
        if self.head == "value":  # zero-initialised: every value starts at 0, the mean of normalised rewards
            return Dense(cfg, (), ("embed",), std=0.0, name="value_head")(x_BxTxD).astype(jnp.float32)
        if return_hidden:  # the loss applies the output layer itself, in vocabulary chunks (tasks/losses.py)
            return x_BxTxD
        if cfg.tie_embeddings:
            logits_BxTxV = embed.attend(x_BxTxD)
        else:
            logits_BxTxV = Dense(cfg, (cfg.vocab_size,), ("embed", "vocab"), peft=self.peft, name="lm_head")(x_BxTxD)
        logits_BxTxV = nn.with_logical_constraint(logits_BxTxV, ("batch", "length", "act_vocab"))
        return softcap(logits_BxTxV.astype(jnp.float32), cfg.logit_softcap)


    def _virtual_tokens(self):
        """Prompt tuning's learned input embeddings (1, V, D), or None."""
        cfg = self.cfg
        if self.peft.method != "prompt" or not adapters.present(self, "prompt"):
            return None
        init = nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("virtual", "embed"))
        prompt = self.param("prompt", init, (self.peft.virtual_tokens, cfg.d_model), jnp.float32)
        return prompt[None].astype(compute_dtype(cfg))


def last_real_index(segment_ids_BxT: jax.Array) -> jax.Array:
    """Index of each row's last real (segment id > 0) token, wherever the padding is; T-1 for all-padding."""
    T = segment_ids_BxT.shape[1]
    return T - 1 - jnp.argmax(segment_ids_BxT[:, ::-1] > 0, axis=1)


def reward_head(cfg: ModelConfig, x_BxTxD: jax.Array, segment_ids_BxT: jax.Array) -> jax.Array:
    """The scalar reward of each sequence, read from the hidden state of its last real token (the end of turn
    that closes the answer): with causal attention it is the only position that has seen the whole answer."""
    last_B = last_real_index(segment_ids_BxT)
    h_BxD = jnp.take_along_axis(x_BxTxD, last_B[:, None, None], axis=1)[:, 0]
    reward_B = Dense(cfg, (), ("embed",), std=cfg.reward_init_std, name="reward_head")(h_BxD)
    return reward_B.astype(jnp.float32)


class PolicyAndValue(nn.Module):
    """What PPO trains: the policy (a language model) and its value model (the same architecture ending in one
    value per position), as one params tree {"policy", "value"}, so that one optimizer, one checkpoint and one
    set of sharding rules hold both. Returns (logits (B, T, V), values (B, T))."""
    cfg: ModelConfig
    peft: PeftConfig = PeftConfig()

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT, segment_ids_BxT):
        args = (tokens_BxT, positions_BxT, segment_ids_BxT)
        return (Transformer(self.cfg, "lm", peft=self.peft, name="policy")(*args),
                Transformer(self.cfg, "value", peft=self.peft, name="value")(*args))
