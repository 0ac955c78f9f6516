"""In-context evaluation (evaluation/icl.py): each kind equals a hand computation on a tiny random model, the
harness's tokenization boundary, left truncation of the exemplars, generation cut and extracted, the same
scores on a mesh, parity with transformers, and a planted in-context skill."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from llm_jax.config import llama
from llm_jax.evaluation import icl, icl_generate
from llm_jax.evaluation.requests import Request
from llm_jax.inference.generate import Generator, Sampling
from llm_jax.inference.runner import ModelRunner
from llm_jax.model import Transformer
from test_evaluate import random_export

HAND_WIDTH = 64
EXEMPLAR = "The dog likes the fish.\n"
REQUESTS = [
    Request("mc", (EXEMPLAR,), "The cat ", ("sees the dog.", "likes", "猫看见了狗。"), (1,), group="a"),
    Request("mc", (EXEMPLAR, EXEMPLAR), "Q: the cat", (" sees", " eats the fish", " x"), (0,), group="b"),
    Request("pairs", (), "", ("the cat sees the dog.", "the cat see the dog."), (0,), group="a"),
    Request("pairs", (), "", ("the cat.", "the cat."), (0,)),  # a tie counts as correct
    Request("mc2", (), "def f(x):\n", ("    return x + 1\n", "    return 2", "pass"), (0, 2)),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(export directory, config, params, tokenizer, plain runner) of a tiny random model."""
    out, cfg, params, tok = random_export(tmp_path_factory)
    return out, cfg, params, tok, ModelRunner(cfg.model, params)


def harness_ids(tok, context: str, choice: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's _encode_pair, an empty context conditioned on EOS."""
    head = context.rstrip()
    ctx = tok.encode(head)
    return ctx or [tok.eos_id], tok.encode(context + choice)[len(ctx):]


@functools.lru_cache
def plain_forward(model_cfg):
    """A plain Transformer.apply over one row of HAND_WIDTH tokens (right padding: causal, so it changes no
    earlier logit), jitted once."""
    return jax.jit(lambda params, ids: Transformer(model_cfg).apply(
        {"params": params}, ids[None], jnp.arange(HAND_WIDTH)[None], jnp.ones((1, HAND_WIDTH), jnp.int32))[0])


def hand_loglik(cfg, params, ctx: list[int], cont: list[int]) -> float:
    """Summed log-probabilities of cont after ctx, from one plain forward pass, log_softmax in float64."""
    ids = np.asarray(ctx + cont, np.int32)
    n = len(ids) - 1
    x = np.asarray(plain_forward(cfg.model)(params, np.pad(ids[:-1], (0, HAND_WIDTH - n))), np.float64)[:n]
    logp = x - x.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(sum(logp[t, ids[t + 1]] for t in range(len(ctx) - 1, n)))


def test_the_boundary_moves_trailing_whitespace_to_the_continuation(tiny):
    *_, tok, _ = tiny
    (e,) = icl.encode_requests(tok, [REQUESTS[0]], context=64)
    assert tok.decode(e.context) == EXEMPLAR + "The cat"
    assert [tok.decode(c) for c in e.continuations] == [" sees the dog.", " likes", " 猫看见了狗。"]
    (pair,) = icl.encode_requests(tok, [REQUESTS[2]], context=64)
    assert pair.context == [tok.eos_id] and tok.decode(pair.continuations[0]) == "the cat sees the dog."


def test_each_kind_equals_a_hand_computation(tiny):
    _, cfg, params, tok, runner = tiny
    scores = icl.score(runner, tok, REQUESTS, context=64, batch_size=2)
    accs, norms = [], []
    for q, r in zip(REQUESTS, scores.results):
        ll = np.array([hand_loglik(cfg, params, *harness_ids(tok, q.context, c)) for c in q.choices])
        np.testing.assert_allclose(r.loglik, ll, atol=1e-4, rtol=1e-5, err_msg=q.question)
        if q.kind == "mc2":
            p = np.exp(ll)
            accs.append(p[list(q.gold)].sum() / p.sum())
        else:
            accs.append(float(np.argmax(ll) == q.gold[0]))
        if q.kind == "mc":
            norms.append(float(np.argmax(ll / [len(c.encode()) for c in q.choices]) == q.gold[0]))
        assert not r.truncated and not r.question_truncated
    np.testing.assert_allclose([r.acc for r in scores.results], accs, atol=1e-4)
    assert scores.results[3].acc == 1.0 and [r.acc_norm for r in scores.results[:2]] == norms
    m = scores.metrics()
    assert m["n"] == 5 and m["truncated"] == 0 and "acc_norm" not in m
    assert m["acc"] == pytest.approx(np.mean(accs), abs=1e-4)
    assert m["stderr"] == pytest.approx(np.std(accs, ddof=1) / math.sqrt(5), abs=1e-4)
    assert m["chance"] == pytest.approx(np.mean([1 / 3, 1 / 3, 1 / 2, 1 / 2, 2 / 3]))
    assert m["groups"] == pytest.approx({"a": (accs[0] + accs[2]) / 2, "b": accs[1]}, abs=1e-4)
    mc = icl.Scores(REQUESTS[:2], scores.results[:2]).metrics()
    assert mc["acc_norm"] == np.mean(norms)


def test_ties_go_to_the_first_choice():
    mc = Request("mc", (), "q", ("a", "b"), (1,))
    assert icl.item_score(mc, np.array([-1.0, -1.0])) == 0.0 and icl.item_score(mc, np.array([-2.0, -1.0])) == 1.0
    pair = Request("pairs", (), "", ("a", "b"), (0,))
    assert icl.item_score(pair, np.array([-3.0, -3.0])) == 1.0
    # per byte: "bb" at -3 beats "a" at -2
    assert icl.norm_score(Request("mc", (), "q", ("a", "bb"), (1,)), np.array([-2.0, -3.0])) == 1.0


def test_long_exemplars_are_cut_from_the_left_and_counted(tiny):
    _, cfg, params, tok, runner = tiny
    long = Request("mc", (EXEMPLAR,) * 6, "The cat ", ("sees the dog.", "likes"), (0,))
    full, cont = harness_ids(tok, long.context, "sees the dog.")
    context = 24
    room = context + 1 - len(cont)
    assert len(full) > room > len(tok.encode("The cat"))
    (e,) = icl.encode_requests(tok, [long], context)
    assert e.context == full[-room:] and e.truncated and not e.question_truncated
    assert tok.decode(e.context).endswith(EXEMPLAR + "The cat")
    (r,) = icl.score(runner, tok, [long], context).results
    assert r.loglik[0] == pytest.approx(hand_loglik(cfg, params, full[-room:], cont), abs=1e-4)
    assert r.truncated and icl.Scores([long], [r]).metrics()["truncated"] == 1
    # the question and the longest continuation alone do not fit: the question's left goes too
    (tight,) = icl.encode_requests(tok, [long], context=len(cont) + 1)
    assert tight.context == full[-2:] and tight.truncated and tight.question_truncated
    (no_shot,) = icl.encode_requests(tok, [Request("mc", (), "The cat sees the dog and ", ("x",), (0,))], 4)
    assert no_shot.question_truncated and not no_shot.truncated
    # a choice longer than the whole context is not scored (a continuation is never cut), and counted
    scores = icl.score(runner, tok, [long, Request("mc", (), "The cat ", ("sees the dog. " * 8, "x"), (0,))], 24)
    assert scores.requests == [long] and scores.metrics()["skipped"] == 1 and scores.metrics()["n"] == 1


def test_generation_is_cut_at_the_stop_and_extracted(tiny, monkeypatch):
    *_, tok, runner = tiny
    outputs = {"A: ": "so 1,040 + 2 = 1,042.\n#### 1,042.\n\nQuestion: #### 7",
               "B: ": "she pays $42. The end\n\nQuestion: 9", "C: ": "no number here"}

    def fixed(self, prompts, max_new_tokens, **kwargs):
        return [tok.encode(outputs.get(tok.decode(p), "")) for p in prompts]

    monkeypatch.setattr(Generator, "generate", fixed)
    reqs = [Request("gen", ("Q: 1+1\nA: #### 2\n\n",) * k, q, answer=a, stop=("\n\n", "Question:"), extract="gsm8k")
            for k, q, a in ((0, "A: ", "1042"), (0, "B: ", "42"), (0, "C: ", "3"))]
    scores = icl.score(runner, tok, reqs, context=64, max_gen_tokens=16)
    a, b, c = scores.results
    assert a.text == "so 1,040 + 2 = 1,042.\n#### 1,042." and a.extracted == "1042" and a.acc == a.acc_flexible == 1
    assert b.text == "she pays $42. The end" and b.extracted is None and (b.acc, b.acc_flexible) == (0, 1)
    assert (c.acc, c.acc_flexible) == (0, 0)
    m = scores.metrics()
    assert (m["acc"], m["acc_flexible"], m["chance"], m["n"]) == (pytest.approx(1 / 3), pytest.approx(2 / 3), 0, 3)
    assert icl_generate.gsm8k("x 3 .. y") == (None, "3") and icl_generate.cut_at_stop("ab\n\nc", ("c", "\n")) == "ab"


def test_generation_is_the_greedy_continuation(tiny):
    *_, tok, runner = tiny
    reqs = [Request("gen", (EXEMPLAR,) * k, "The cat", answer="1", stop=("e",), extract="gsm8k") for k in (0, 3)]
    scores = icl.score(runner, tok, reqs, context=64, batch_size=4, max_gen_tokens=6)
    want = Generator(runner, Sampling(temperature=0.0)).generate([tok.encode(q.context) for q in reqs], 6,
                                                                 pad_id=tok.pad_id)
    assert [r.text for r in scores.results] == [tok.decode(w).split("e")[0] for w in want]


def test_a_runner_on_a_mesh_scores_alike(tiny):
    out, *_, tok, runner = tiny
    _, sharded, _ = ModelRunner.load(out)
    assert sharded.mesh is not None and sharded.mesh.size == len(jax.devices())
    want = icl.score(runner, tok, REQUESTS, context=64, batch_size=3).results
    got = icl.score(sharded, tok, REQUESTS, context=64, batch_size=3).results
    np.testing.assert_allclose([x for r in got for x in r.loglik], [x for r in want for x in r.loglik], atol=1e-4)


@pytest.mark.slow
def test_loglikelihoods_equal_transformers_on_an_imported_gpt2(tmp_path):
    """A tiny GPT-2 (byte-level BPE) imported from transformers: every choice's log-likelihood in 20 two-choice
    requests with an exemplar equals torch's, over the same token ids, to 1e-4."""
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from llm_jax.interop.hf import import_hf
    from test_hf import bpe_tokenizer_json, tiny_hf
    model = tiny_hf("gpt2", True, vocab_size=300)
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(bpe_tokenizer_json())
    import_hf(tmp_path / "hf", tmp_path / "export")
    cfg, runner, tok = ModelRunner.load(tmp_path / "export")
    rng = np.random.default_rng(0)
    words = "the cat sat on mat and dog ate hat a bat rat ran to at dawn hello world 你好".split()
    phrase = lambda n: " ".join(rng.choice(words, n))  # noqa: E731
    reqs = [Request("mc", (f"Goal: {phrase(2)}\nSolution: {phrase(2)}\n\n",), f"Goal: {phrase(2)}\nSolution:",
                    (f" {phrase(2)}", f" {phrase(2)}."), (int(rng.integers(2)),)) for _ in range(20)]
    scores = icl.score(runner, tok, reqs, context=cfg.data.seq_len, batch_size=8)
    for q, r in zip(reqs, scores.results):
        want = []
        for choice in q.choices:
            ctx, cont = harness_ids(tok, q.context, choice)
            ids = ctx + cont
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits.double(), -1)[0].numpy()
            want.append(sum(logp[t, ids[t + 1]] for t in range(len(ctx) - 1, len(ids) - 1)))
        np.testing.assert_allclose(r.loglik, want, atol=1e-4, rtol=0, err_msg=q.question)
        assert not r.truncated


# --- a planted in-context skill ------------------------------------------------------------------------------

KEYS, VALUES = "abcdefgh", "ABCDEFGH"


class PairTokenizer:
    """Characters, except that a key, its value and ";" make one token: recalling a pair shown earlier is then
    one attention layer's job, which a tiny model learns in a few hundred steps (two characters would need an
    induction head, which takes thousands). "a" + "A" (no ";") stays two tokens, so the harness's boundary holds."""
    pad_id, eos_id = 0, 1

    def __init__(self):
        pieces = list(KEYS + VALUES + "|") + [k + v + ";" for k in KEYS for v in VALUES]
        self.ids = {p: i for i, p in enumerate(pieces, start=2)}
        self.vocab_size = len(pieces) + 2

    def encode(self, text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            n = 3 if text[i:i + 3] in self.ids else 1
            out.append(self.ids[text[i:i + n]])
            i += n
        return out

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]


def mapping_episode(rng, shots: int = 4):
    """A fresh key -> value mapping and the `shots` keys shown."""
    return dict(zip(KEYS, rng.permutation(list(VALUES)))), list(rng.permutation(list(KEYS))[:shots])


def skill_sequences(rng, tok, n: int, queries: int = 8) -> np.ndarray:
    """Training rows: 4 pairs of a fresh mapping ("aB;"), then queries of the keys shown ("aB|")."""
    rows = []
    for _ in range(n):
        f, shown = mapping_episode(rng)
        rows.append(tok.encode("".join(f"{k}{f[k]};" for k in shown) +
                               "".join(f"{k}{f[k]}|" for k in rng.choice(shown, queries))))
    return np.asarray(rows, np.int32)


def train_skill(tok, steps: int = 400, batch: int = 32) -> ModelRunner:
    """Adam on the recalled values only (a lone key's next token): the rest is noise that slows the skill."""
    cfg = llama(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64, compute_dtype="float32")
    model, rng, keys = Transformer(cfg), np.random.default_rng(0), [tok.ids[k] for k in KEYS]
    width = skill_sequences(rng, tok, 1).shape[1] - 1
    positions, segments = jnp.broadcast_to(jnp.arange(width), (batch, width)), jnp.ones((batch, width), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), segments, positions, segments))["params"]
    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(params, state, rows, recalled):
        def loss(p):
            logits = model.apply({"params": p}, rows[:, :-1], positions, segments)
            return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:]) * recalled)
        updates, state = optimizer.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = optimizer.init(params)
    for _ in range(steps):
        rows = skill_sequences(rng, tok, batch)
        recalled = np.isin(rows[:, :-1], keys)
        params, state = step(params, state, rows, recalled / recalled.sum())
    return ModelRunner(cfg, params)


@pytest.mark.slow
def test_a_planted_in_context_skill_scores_higher_with_shots():
    """A model trained to recall a per-sequence mapping from the pairs shown before scores far above chance with
    the 4 pairs as exemplars, and about chance with none (seed 0: ~0.98 and ~0.13 after 400 steps; other seeds
    learn the skill up to a few hundred steps later, hence the margin)."""
    tok = PairTokenizer()
    runner = train_skill(tok)
    rng = np.random.default_rng(1)
    episodes = [mapping_episode(rng) for _ in range(48)]
    by_shots = {}
    for shots in (0, 4):
        reqs = [Request("mc", tuple(f"{k}{f[k]};" for k in shown[:shots]), shown[-1], tuple(VALUES),
                        (VALUES.index(f[shown[-1]]),)) for f, shown in episodes]
        by_shots[shots] = icl.score(runner, tok, reqs, context=32).metrics()
    assert by_shots[4]["acc"] >= by_shots[0]["acc"] + 0.3 and by_shots[0]["acc"] <= 0.3, by_shots
    assert by_shots[0]["chance"] == by_shots[4]["chance"] == 1 / 8
