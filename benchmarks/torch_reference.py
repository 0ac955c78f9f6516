"""A straightforward PyTorch (eager, CPU) implementation of llm_jax's Llama model and train step, for speed
comparisons on the same machine.

    python benchmarks/torch_reference.py --config pretrain_tiny [--set model.n_layers=6 ...] [--steps 20]

What a competent PyTorch user writes, not handicapped: nn.Module layers, fused QKV and gate/up projections,
nn.RMSNorm, F.scaled_dot_product_attention(is_causal=True, enable_gqa=True), F.cross_entropy,
torch.optim.AdamW and clip_grad_norm_, run eagerly (no torch.compile) in float32 with all the machine's
threads. It is the same architecture as llm_jax.model.Transformer for the Llama configs (rmsnorm, rope,
swiglu, untied head, no biases): `load_llm_jax_params` copies llm_jax params in, and
tests/test_torch_reference.py checks that the logits agree.

Conventions mirrored from llm_jax:
- init: embeddings, q/k/v, gate/up and lm_head ~ normal(init_std); the residual-branch outputs (attention o,
  mlp down) ~ normal(init_std / sqrt(2 * n_layers)); norm scales 1. Plain (not truncated) normals.
- RoPE rotates the two halves of each head (the Llama / HF layout, not interleaved pairs), with
  freq_i = theta ** (-i / (head_dim / 2)) computed in float32.
- GQA: query head n reads kv head n // (n_heads // n_kv_heads).
- loss: mean over all target tokens of the float32 cross-entropy (llm_jax: summed nats / token count).
- AdamW (b1, b2, eps outside the sqrt, decoupled weight decay scaled by the learning rate) decaying only
  matrices and embeddings (llm_jax's decay_mask: "kernel" and "embedding"), after global-norm clipping.
The learning rate is held at optim_cfg.learning_rate: llm_jax's warmup-cosine schedule costs one scalar per
step and does not change the work of a step.

Importable without side effects: nothing runs and no thread setting changes until a function is called.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def default_threads() -> int:
    """All the cores this process may run on.

    On the idle 2-core machine 2 threads run a pretrain_tiny step in ~0.22 s against ~0.39 s for 1 thread
    (and ~0.86 s against ~1.7 s for a 6-layer 384-wide model). While another process keeps a core busy, 2
    threads can be several times slower than 1 (each OpenMP barrier waits for the descheduled thread): time
    on an idle machine, as for llm_jax, whose XLA CPU backend also uses every core.
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _check_supported(cfg) -> None:
    wanted = {"norm": "rmsnorm", "position": "rope", "mlp": "swiglu", "tie_embeddings": False,
              "use_bias": False, "qk_norm": False, "logit_softcap": 0.0}
    wrong = {k: getattr(cfg, k) for k, v in wanted.items() if getattr(cfg, k) != v}
    if wrong:
        raise ValueError(f"the torch reference implements the Llama architecture ({wanted}); got {wrong}")


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (T, head_dim // 2) for positions 0..T-1, in float32 as llm_jax computes them."""
    half = head_dim // 2
    freq = 1.0 / theta ** (torch.arange(half, dtype=torch.float32) / half)
    angle = torch.arange(seq_len, dtype=torch.float32)[:, None] * freq
    return torch.cos(angle), torch.sin(angle)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, H): rotate the two halves of each head (llm_jax.model.layers.apply_rope)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n, self.k, self.h = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        self.qkv = nn.Linear(cfg.d_model, (self.n + 2 * self.k) * self.h, bias=False)
        self.o = nn.Linear(self.n * self.h, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.n * self.h, self.k * self.h, self.k * self.h], dim=-1)
        q = apply_rope(q.view(B, T, self.n, self.h).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, T, self.k, self.h).transpose(1, 2), cos, sin)
        v = v.view(B, T, self.k, self.h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.k != self.n)
        return self.o(out.transpose(1, 2).reshape(B, T, self.n * self.h))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.d_ff = cfg.d_ff
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.d_ff, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """tokens (B, T) int64, positions 0..T-1 -> next-token logits (B, T, V) in float32."""

    def __init__(self, cfg):
        super().__init__()
        _check_supported(cfg)
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._rope: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith(("attn.o.weight", "mlp.down.weight")):
                p.normal_(0.0, out_std)
            else:
                p.normal_(0.0, std)

    def _rope_tables(self, seq_len: int):
        if self._rope is None or self._rope[0] < seq_len:
            self._rope = (seq_len, *rope_tables(seq_len, self.cfg.resolved_head_dim, self.cfg.rope_theta))
        return self._rope[1][:seq_len], self._rope[2][:seq_len]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        cos, sin = self._rope_tables(tokens.shape[1])
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.final_norm(x)).float()


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(model_cfg, optim_cfg, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model (float32, initialised as llm_jax does) and its AdamW, decaying matrices and embeddings only."""
    torch.manual_seed(seed)
    model = Transformer(model_cfg)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optim_cfg.learning_rate, betas=(optim_cfg.b1, optim_cfg.b2), eps=optim_cfg.eps, foreach=True)
    return model, optimizer


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
               grad_clip: float) -> float:
    """One AdamW step on the mean next-token cross-entropy; returns the loss (nats per token) before it."""
    logits = model(inputs)
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    optimizer.step()
    return loss.item()


@torch.no_grad()
def load_llm_jax_params(model: Transformer, params) -> None:
    """Copies llm_jax params (nn.unbox(...)["params"], scanned or unrolled layers) into `model`.

    llm_jax Dense kernels are (in..., out...), e.g. q (D, N, H) and o (N, H, D); torch Linear weights are
    (out, in), with q, k, v stacked into one qkv weight and gate, up into one gate_up weight.
    """
    def t(a) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32))

    def kernel(a) -> torch.Tensor:  # (D, ...) -> (out, D)
        a = t(a)
        return a.reshape(a.shape[0], -1).T

    def layer(i: int) -> dict:
        def take(tree):
            return {k: take(v) for k, v in tree.items()} if isinstance(tree, dict) else np.asarray(tree)[i]
        if "layers" in params:  # nn.scan: every leaf has a leading layer axis
            return take(params["layers"])
        return params[f"layer_{i}"]

    model.embed.weight.copy_(t(params["embed"]["embedding"]))
    for i, block in enumerate(model.layers):
        p = layer(i)
        a, m = p["attn"], p["mlp"]
        block.attn_norm.weight.copy_(t(p["attn_norm"]["scale"]))
        block.mlp_norm.weight.copy_(t(p["mlp_norm"]["scale"]))
        block.attn.qkv.weight.copy_(torch.cat([kernel(a[n]["kernel"]) for n in ("q", "k", "v")]))
        o = t(a["o"]["kernel"])  # (N, H, D)
        block.attn.o.weight.copy_(o.reshape(-1, o.shape[-1]).T)
        block.mlp.gate_up.weight.copy_(torch.cat([kernel(m["gate"]["kernel"]), kernel(m["up"]["kernel"])]))
        block.mlp.down.weight.copy_(kernel(m["down"]["kernel"]))
    model.final_norm.weight.copy_(t(params["final_norm"]["scale"]))
    model.lm_head.weight.copy_(kernel(params["lm_head"]["kernel"]))


class Timer:
    """The model, its optimizer and one fixed random batch, ready to time train steps in blocks.

    `block` sets the thread count for its steps and restores it afterwards, so blocks can alternate with
    llm_jax's in one process (bench train --compare-torch) without either side's settings leaking.
    """

    def __init__(self, model_cfg, optim_cfg, batch_size: int, seq_len: int, threads: int | None = None,
                 seed: int = 0):
        self.threads = threads or default_threads()
        self.model, self.optimizer = build(model_cfg, optim_cfg, seed)
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, model_cfg.vocab_size, (batch_size, seq_len + 1), generator=gen)
        self.inputs, self.targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        self.clip, self.tokens_per_step = optim_cfg.grad_clip, batch_size * seq_len

    def block(self, steps: int, warmup: int) -> list[float]:
        """Seconds of each of `steps` train steps, after `warmup` untimed ones.

        Each step is timed with perf_counter around train_step, whose loss.item() waits for it to finish.
        """
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            for _ in range(warmup):
                train_step(self.model, self.optimizer, self.inputs, self.targets, self.clip)
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                train_step(self.model, self.optimizer, self.inputs, self.targets, self.clip)
                times.append(time.perf_counter() - start)
        finally:
            torch.set_num_threads(previous)
        return times


def tokens_per_sec(model_cfg, optim_cfg, batch_size: int, seq_len: int, steps: int = 20, warmup: int = 3,
                   threads: int | None = None, seed: int = 0) -> dict:
    """Times `steps` train steps (after `warmup` untimed ones) on one fixed random batch; the thread count
    is restored afterwards."""
    timer = Timer(model_cfg, optim_cfg, batch_size, seq_len, threads, seed)
    times = timer.block(steps, warmup)
    median = statistics.median(times)
    return {"tokens_per_sec": timer.tokens_per_step / median, "step_time_s": median, "step_times": times,
            "step_time_min_s": min(times), "params": param_count(timer.model), "threads": timer.threads}


def main(argv: list[str] | None = None) -> None:
    from llm_jax import runtime
    from llm_jax.experiment import apply_overrides, load_experiment, resolve

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="pretrain_tiny", help="experiment name under experiments/ or a path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=0, help="default: the config's train.batch_size")
    p.add_argument("--seq-len", type=int, default=0, help="default: the config's data.seq_len")
    p.add_argument("--threads", type=int, default=0, help=f"default: all cores ({default_threads()})")
    args = p.parse_args(argv)
    cfg = resolve(apply_overrides(load_experiment(args.config), args.set))
    batch, seq = args.batch_size or cfg.train.batch_size, args.seq_len or cfg.data.seq_len
    r = tokens_per_sec(cfg.model, cfg.optim, batch, seq, steps=args.steps, warmup=args.warmup,
                       threads=args.threads or None, seed=cfg.train.seed)
    m = cfg.model
    print(f"torch {torch.__version__} eager CPU, float32, {r['threads']} threads; {cfg.name}: "
          f"{m.n_layers} layers, d_model {m.d_model}, {m.n_heads}/{m.n_kv_heads} heads, d_ff {m.d_ff}, "
          f"vocab {m.vocab_size}; batch {batch} x seq {seq}; malloc {runtime.malloc_mode} (llm_jax/runtime.py)")
    print(f"params {r['params']:,}")
    print(f"tokens/s {r['tokens_per_sec']:,.0f}")
    print(f"median step time {r['step_time_s'] * 1e3:.1f} ms "
          f"(min {r['step_time_min_s'] * 1e3:.1f}, max {max(r['step_times']) * 1e3:.1f}, {len(r['step_times'])} steps)")


if __name__ == "__main__":
    main()
