"""The training-recipe switches, each against its formula or a hand computation, and the wall-clock budget."""
import dataclasses
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn

from llm_jax.cli.main import main
from llm_jax.config import Config, OptimConfig, TrainConfig, llama
from llm_jax.data.batches import TokenBatch, positions_from_segments
from llm_jax.model import Transformer
from llm_jax.model.dropout import dropout
from llm_jax.model.layers import MLP
from llm_jax.tasks import losses
from llm_jax.tasks.pretrain import Pretrain
from llm_jax.train import budget, checkpoint, optim

CFG = llama(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, compute_dtype="float32")


def _batch(rows=2, length=8, seed=0) -> TokenBatch:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (rows, length + 1)).astype(np.int32)
    segments = np.ones((rows, length), np.int32)
    return TokenBatch(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=segments,
                      positions=positions_from_segments(segments), weights=rng.random((rows, length)).astype(np.float32),
                      target_bytes=np.ones((rows, length), np.int32))


def _params(cfg, seed=0):
    b = _batch()
    init = jax.jit(Transformer(cfg).init)  # (eager, each of the model's operations compiles on its own)
    return nn.unbox(init(jax.random.key(seed), b.inputs, b.positions, b.segment_ids)["params"])


def test_schedules_follow_their_formulas():
    cos = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    f = lambda cfg, s, n: float(optim.lr_factor(cfg, s, n))  # noqa: E731
    assert [f(cos, s, 111) for s in (0, 5, 10)] == pytest.approx([0.0, 0.5, 1.0])
    assert f(cos, 40, 111) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.3)))
    assert f(cos, 110, 111) == pytest.approx(0.1)  # the last update at the floor
    wsd = dataclasses.replace(cos, schedule="wsd", decay_fraction=0.2)
    assert [f(wsd, s, 100) for s in (10, 50, 80)] == pytest.approx([1.0, 1.0, 1.0])  # stable until the last 20
    assert f(wsd, 90, 100) == pytest.approx(1 - 0.9 * 10 / 19) and f(wsd, 99, 100) == pytest.approx(0.1)
    assert f(cos, 1000, 0) == f(wsd, 1000, 0) == 1.0  # not planned yet (a budget measuring): the peak


def _newton_schulz(g: np.ndarray, steps=5, coeffs=(3.4445, -4.775, 2.0315)) -> np.ndarray:
    """Muon's orthogonalisation written out (Keller Jordan's reference)."""
    x = g / (np.linalg.norm(g) + 1e-8)
    wide = x.shape[0] > x.shape[1]
    x = x.T if wide else x
    a, b, c = coeffs
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if wide else x


def test_muon_step_matches_a_hand_computation():
    """First step on the blocks' kernels: Nesterov momentum's g·(1 + β/(1+β)) orthogonalised (scale-free),
    times sqrt(max(1, fan_out/fan_in)) and -lr, less decoupled weight decay; the 3-D attention kernels as
    (D, N·H) matrices; embeddings, norms and the output layer get plain AdamW."""
    cfg = OptimConfig(optimizer="muon", muon_learning_rate=0.05, learning_rate=0.01, weight_decay=0.1, grad_clip=0.0)
    params = jax.tree.map(np.asarray, _params(CFG))
    grads = jax.tree.map(lambda p: np.random.default_rng(p.size).normal(size=p.shape).astype(np.float32), params)
    opt = optim.make_optimizer(cfg)
    updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)  # (eager, each op compiles alone)
    for name, (kernel, as_matrix) in {"up": (("mlp", "up"), lambda k: k), "down": (("mlp", "down"), lambda k: k),
                                      "q": (("attn", "q"), lambda k: k.reshape(k.shape[0], -1))}.items():
        # Stacked layers (scan_layers): each layer's slice is its own matrix.
        w, g = params["layers"][kernel[0]][kernel[1]]["kernel"][1], grads["layers"][kernel[0]][kernel[1]]["kernel"][1]
        m = as_matrix(g)
        expected = -cfg.muon_learning_rate * (_newton_schulz(m) * math.sqrt(max(1.0, m.shape[1] / m.shape[0]))
                                              + cfg.weight_decay * as_matrix(w))
        got = as_matrix(np.asarray(updates["layers"][kernel[0]][kernel[1]]["kernel"][1]))
        np.testing.assert_allclose(got, expected, atol=2e-5, err_msg=name)
    adamw = optax.adamw(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=optim.decay_mask)
    plain, _ = jax.jit(adamw.update)(grads, adamw.init(params), params)
    for path in (("embed", "embedding"), ("lm_head", "kernel"), ("final_norm", "scale")):
        np.testing.assert_allclose(updates[path[0]][path[1]], plain[path[0]][path[1]], rtol=1e-6, err_msg=str(path))


def test_logit_softcap_is_the_tanh_of_the_plain_logits_chunked_or_not():
    capped = dataclasses.replace(CFG, logit_softcap=2.0, init_std=0.5)
    params, b = _params(capped), _batch()
    args = (b.inputs, b.positions, b.segment_ids)
    plain = jax.jit(Transformer(dataclasses.replace(capped, logit_softcap=0.0)).apply)({"params": params}, *args)
    logits = jax.jit(Transformer(capped).apply)({"params": params}, *args)
    assert float(jnp.abs(plain).max()) > 2.0  # the cap binds
    np.testing.assert_allclose(logits, 2.0 * np.tanh(plain / 2.0), rtol=1e-5, atol=1e-6)
    chunked = Transformer(dataclasses.replace(capped, logits_chunk=16))
    nats_and_lse = jax.jit(losses.next_token_nats_and_lse, static_argnums=0)
    for got, want in zip(nats_and_lse(chunked, params, b), nats_and_lse(Transformer(capped), params, b)):
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_z_loss_adds_its_formula_to_the_objective_and_its_gradient():
    model, params, b = Transformer(CFG), _params(CFG), _batch()
    task = Pretrain(Config(model=CFG, train=TrainConfig(z_loss=0.01)))

    def by_hand(p):
        logits = model.apply({"params": p}, b.inputs, b.positions, b.segment_ids)
        lse = jax.nn.logsumexp(logits, axis=-1)
        nats = lse - jnp.take_along_axis(logits, b.targets[..., None], axis=-1)[..., 0]
        return jnp.sum((nats + 0.01 * lse ** 2) * b.weights)
    sums = jax.jit(lambda p: task.sums(model, p, b, {}))(params)
    assert float(sums["objective"]) == pytest.approx(float(jax.jit(by_hand)(params)), rel=1e-5)
    assert float(sums["objective"]) > float(sums["nats"])  # the reported nats stay the plain ones
    got = jax.jit(jax.grad(lambda p: task.sums(model, p, b, {})["objective"]))(params)
    want = jax.jit(jax.grad(by_hand))(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    cfg = dataclasses.replace(CFG, qk_norm=True, init_std=0.3)  # queries and keys well above the norm's epsilon
    params, b = _params(cfg), _batch()
    assert params["layers"]["attn"]["q_norm"]["scale"].shape == (cfg.n_layers, cfg.resolved_head_dim)

    @jax.jit
    def logits(p):
        return Transformer(cfg).apply({"params": p}, b.inputs, b.positions, b.segment_ids)

    def scaled(tree, factor):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: x * factor if any(getattr(k, "key", "") in ("q", "k") for k in path) else x, tree)
    np.testing.assert_allclose(logits(scaled(params, 7.0)), logits(params), rtol=1e-3, atol=1e-4)
    plain = dataclasses.replace(cfg, qk_norm=False)
    attn = {k: v for k, v in params["layers"]["attn"].items() if k not in ("q_norm", "k_norm")}
    unnormed = {**params, "layers": {**params["layers"], "attn": attn}}
    out = Transformer(plain).apply({"params": scaled(unnormed, 7.0)}, b.inputs, b.positions, b.segment_ids)
    assert not np.allclose(out, Transformer(plain).apply({"params": unnormed}, b.inputs, b.positions, b.segment_ids),
                           atol=1e-3)  # without the norm the same scaling changes the output


def test_relu_squared_mlp_by_hand():
    cfg = dataclasses.replace(CFG, mlp="relu2")
    x = np.random.default_rng(0).normal(size=(2, 3, cfg.d_model)).astype(np.float32)
    variables = MLP(cfg).init(jax.random.key(0), x)
    p = variables["params"]
    up, down = p["up"]["kernel"].unbox(), p["down"]["kernel"].unbox()
    np.testing.assert_allclose(MLP(cfg).apply(variables, x), np.maximum(x @ up, 0) ** 2 @ down, rtol=1e-5, atol=1e-6)
    assert "gate" not in p


def test_dropout_only_where_a_dropout_key_is_given():
    """model.dropout zeroes a fraction of the embeddings and of each residual branch in train steps (which pass a
    key), scaled to keep the mean; without a key (evaluation, decoding) the model is the one without dropout."""
    b = _batch()
    args = (b.inputs, b.positions, b.segment_ids)
    params = _params(CFG)  # scanned layers: nn.scan splits the key, so each layer draws its own mask
    dropped = Transformer(dataclasses.replace(CFG, dropout=0.5))
    run = jax.jit(lambda key: dropped.apply({"params": params}, *args, rngs={"dropout": key}))
    a, again, other = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    np.testing.assert_array_equal(a, again)
    assert np.abs(np.asarray(a - other)).max() > 1e-2  # another key, another mask
    np.testing.assert_array_equal(jax.jit(dropped.apply)({"params": params}, *args),
                                  jax.jit(Transformer(CFG).apply)({"params": params}, *args))
    # Each of the 1 + 2L places (the embeddings, each block's two branches) draws a key of its own: flax's
    # make_rng folds the call's key once per draw. (Unrolled layers: under nn.scan the block is traced once.)
    for rate, draws in ((0.5, 1 + 2 * CFG.n_layers), (0.0, 0)):
        unrolled = Transformer(dataclasses.replace(CFG, scan_layers=False, dropout=rate))
        p = _params(dataclasses.replace(CFG, scan_layers=False))
        jaxpr = jax.make_jaxpr(lambda key: unrolled.apply({"params": p}, *args, rngs={"dropout": key}))(
            jax.random.key(1))
        assert str(jaxpr).count("random_fold_in") == draws
    embedded = nn.Embed(8, 256)
    x = embedded.apply(embedded.init(jax.random.key(0), jnp.arange(8)), jnp.arange(8))

    class Drop(nn.Module):
        @nn.compact
        def __call__(self, x):
            return dropout(self, x, 0.25)
    y = np.asarray(Drop().apply({}, x, rngs={"dropout": jax.random.key(3)}))
    kept = y != 0
    assert 0.7 < kept.mean() < 0.8
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)


def test_a_resumed_clock_goes_on_from_the_recorded_time():
    before = {"train_time_s": 50.0, "eval_time_s": 7.0, "checkpoint_time_s": 2.0}
    clock = budget.Clock(before)
    assert clock.train_s() == pytest.approx(50.0, abs=0.05)
    with clock.excluding("eval"):
        pass
    report = clock.report()
    assert report["eval_time_s"] == pytest.approx(7.0, abs=0.05) and report["checkpoint_time_s"] == 2.0
    assert budget.Clock().train_s() < 0.05


def test_shorter_windows_keep_every_token():
    b = _batch(rows=4, length=8)
    micro = jax.tree.map(lambda a: a.reshape(2, 2, 8), b)
    short = TokenBatch(*micro).shorter(4)
    assert short.inputs.shape == (2, 8, 2)
    np.testing.assert_array_equal(short.targets.reshape(-1), b.targets.reshape(-1))


def test_budget_plans_from_the_measured_rate():
    class FakeClock:
        t = 0.0

        def train_s(self):
            return self.t
    clock = FakeClock()
    plan = budget.Budget(100.0, clock, measure_from=1)
    clock.t = 10.0  # the first step, with its compilation
    assert plan.propose(1) == 0
    clock.t = 12.0  # 5 steps in 2 s: not yet 5% of the budget
    assert plan.propose(6) == 0
    clock.t = 15.0  # 10 steps in 5 s: 0.5 s a step, 85 s left
    assert plan.propose(11) == 11 + 170
    plan.accept()
    clock.t = 40.0
    assert plan.propose(60) == 0  # the next plan waits for half the budget
    clock.t = 50.0  # steps 11..81 took 35 s: 0.5 s a step still
    assert plan.propose(81) == 81 + 100
    plan.accept()
    clock.t = 80.0  # the machine got slower: steps 81..111 took 30 s, 1 s a step, and 20 s are left
    assert plan.propose(111) == 111 + 20
    plan.accept()
    clock.t = 95.0
    assert plan.propose(126) == 126 + 5
    plan.accept()
    clock.t = 99.0
    assert plan.propose(130) == 0  # no plan after the last of REPLAN_AT

    clock.t = 60.0  # resumed from a checkpoint at step 500 that holds a plan and 60 s of training
    resumed = budget.Budget(100.0, clock, measure_from=501, planned=True)
    clock.t = 63.0  # step 501, with the compilation
    assert resumed.propose(501) == 0
    clock.t = 79.0
    assert resumed.propose(533) == 0  # the next plan is due at 80%, the first fraction ahead
    clock.t = 80.0  # steps 501..541 took 17 s
    assert resumed.propose(541) == 541 + int(20.0 * 40 / 17.0)
    resumed.accept()
    clock.t = 96.0
    assert resumed.propose(581) == 581 + 10  # 40 steps in 16 s, and 4 s left
    resumed.accept()
    assert resumed.propose(590) == 0
    late = budget.Budget(100.0, clock, measure_from=601, planned=True)  # resumed past 95%: no plan ahead
    assert [late.propose(s) for s in (601, 650)] == [0, 0]


@pytest.mark.slow
def test_time_budget_run_stops_on_time_with_its_schedule_completed(tmp_path, train_args, scalars):
    run = tmp_path / "run"
    budget_args = train_args(run, "train.time_budget_s=20", "train.steps=100000", "train.eval_every=100000",
                             "checkpoint.every=100", "checkpoint.keep=100", "optim.schedule=wsd")
    assert main(budget_args) == 0
    results = json.loads((run / "results.json").read_text())
    assert 18.0 <= results["train_time_s"] <= 22.0, results
    assert results["eval_time_s"] > 0 and results["checkpoint_time_s"] > 0 and results["steps"] < 100000
    found, _ = scalars(run)
    lr = found["optim/learning_rate"]
    assert lr[-1][0] == results["steps"]
    assert lr[-1][1] == pytest.approx(1e-2 * 0.1, rel=0.05)  # the planned decay reached its floor
    assert found["time/train_s"][-1][0] == results["steps"]

    # Killed after a checkpoint near the end: the resumed run starts from that checkpoint's plan (and may plan
    # again at a fraction of the budget still ahead), and its clock goes on from the time the checkpoint
    # recorded (training time only: the 20 s are not spent again).
    steps = checkpoint.committed_steps(run)
    resume_at = steps[-2] if steps[-1] == results["steps"] else steps[-1]
    for later in steps[steps.index(resume_at) + 1:]:
        shutil.rmtree(run / "checkpoints" / str(later))
    meta = json.loads((run / "checkpoints" / str(resume_at) / "meta" / "metadata").read_text())
    with ocp.StandardCheckpointer() as reader:
        planned = int(reader.restore((run / "checkpoints" / str(resume_at) / "state").absolute())["planned_steps"])
    (run / "results.json").unlink()
    assert main(budget_args) == 0
    resumed = json.loads((run / "results.json").read_text())
    # Its plan is the checkpoint's, or one made again at a fraction of the budget still ahead of it.
    assert resume_at < resumed["steps"] and abs(resumed["steps"] - planned) <= 0.1 * planned, (resumed, planned)
    assert meta["time"]["train_time_s"] < resumed["train_time_s"] < 22.0 + 5.0, (meta["time"], resumed)
    assert resumed["checkpoint_time_s"] >= meta["time"]["checkpoint_time_s"]
    found, _ = scalars(run)
    times = [v for _, v in found["time/train_s"]]
    assert times == sorted(times) and found["optim/learning_rate"][-1][0] == resumed["steps"]
    assert found["optim/learning_rate"][-1][1] == pytest.approx(1e-2 * 0.1, rel=0.05)
