"""Generation: KV-cache decoding equals the full forward pass; sampling filters; batching; stopping."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llm_jax.cli.main import main
from llm_jax.config import gpt2, llama
from llm_jax.errors import ConfigError
from llm_jax.inference.generate import Generator, Sampling, check_sampling, filter_logits, left_pad
from llm_jax.inference.runner import ModelRunner
from llm_jax.model import Transformer

VOCAB = 61


def tiny(**kw):
    return llama(**{**dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                           compute_dtype="float32"), **kw})


def params_for(cfg, seed=0):
    dummy = jnp.zeros((1, 8), jnp.int32)
    return nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(seed), dummy, dummy, jnp.ones_like(dummy)))["params"]


@pytest.mark.parametrize("scan, padding", [(True, "left"), (False, "right"),
                                           pytest.param(False, "left", marks=pytest.mark.slow),
                                           pytest.param(True, "right", marks=pytest.mark.slow)])
def test_kv_cache_decoding_equals_the_full_forward_pass(scan, padding):
    cfg = tiny(scan_layers=scan)
    params = params_for(cfg)
    T, prefill = 12, 5
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, VOCAB, (2, T)).astype(np.int32)
    segments = np.ones((2, T), np.int32)
    if padding == "left":
        segments[1, :4] = 0  # row 1: four pad tokens, then its prompt
    else:
        segments[1, -4:] = 0
    starts = np.argmax(segments == 1, axis=1)
    positions = np.maximum(np.arange(T)[None] - starts[:, None], 0).astype(np.int32)
    full = jax.jit(Transformer(cfg).apply)({"params": params}, tokens, positions, segments)

    gen = Generator(ModelRunner(cfg, params))
    decode = jax.jit(lambda p, c, t, pos, seg: gen.model.apply({"params": p, "cache": c}, t, pos, seg,
                                                               mutable=["cache"]))
    cache = gen.runner.empty_cache(2, T)
    logits, state = decode(params, cache, tokens[:, :prefill], positions[:, :prefill], segments[:, :prefill])
    stepped = [logits]
    cache = state["cache"]
    for t in range(prefill, T):
        logits, state = decode(params, cache, tokens[:, t:t + 1], positions[:, t:t + 1], segments[:, t:t + 1])
        stepped.append(logits)
        cache = state["cache"]
    stepped = np.concatenate(stepped, axis=1)
    real = segments == 1
    np.testing.assert_allclose(stepped[real], np.asarray(full)[real], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_batched_prompts_of_different_lengths_decode_like_each_alone():
    cfg = tiny()
    gen = Generator(ModelRunner(cfg, params_for(cfg)), Sampling(temperature=0))
    prompts = [[5, 9, 11, 3, 7, 21, 2], [8, 4], [30, 31, 32, 33]]
    together = gen.generate(prompts, 6)
    alone = [gen.generate([p], 6)[0] for p in prompts]
    assert together == alone and all(len(o) == 6 for o in together)


@pytest.mark.slow
def test_greedy_is_deterministic_and_sampling_repeats_under_a_seed():
    cfg = tiny()
    params = params_for(cfg)
    greedy = Generator(ModelRunner(cfg, params), Sampling(temperature=0))
    assert greedy.generate([[1, 2, 3]], 8) == greedy.generate([[1, 2, 3]], 8)
    sampler = Generator(ModelRunner(cfg, params), Sampling(temperature=1.5, top_k=20, top_p=0.95))
    a, b = sampler.generate([[1, 2, 3]] * 4, 10, seed=3), sampler.generate([[1, 2, 3]] * 4, 10, seed=3)
    assert a == b
    assert a != sampler.generate([[1, 2, 3]] * 4, 10, seed=4)


def test_top_k_and_top_p_keep_exactly_the_right_tokens():
    probs = np.array([[0.05, 0.5, 0.15, 0.3]])
    logits = jnp.log(jnp.asarray(probs))
    kept = lambda out: set(np.flatnonzero(np.isfinite(np.asarray(out)[0])).tolist())
    assert kept(filter_logits(logits, top_k=2, top_p=1.0)) == {1, 3}
    assert kept(filter_logits(logits, top_k=1, top_p=1.0)) == {1}
    assert kept(filter_logits(logits, top_k=0, top_p=0.75)) == {1, 3}     # 0.5 + 0.3 reaches 0.75
    assert kept(filter_logits(logits, top_k=0, top_p=0.85)) == {1, 2, 3}  # 0.5 + 0.3 < 0.85
    assert kept(filter_logits(logits, top_k=0, top_p=0.4)) == {1}         # the top token always stays
    assert kept(filter_logits(logits, top_k=3, top_p=0.75)) == {1, 3}
    np.testing.assert_allclose(np.asarray(filter_logits(logits, 0, 1.0)), np.asarray(logits))


def test_generation_stops_at_a_stop_token_and_at_the_budget():
    cfg = tiny()
    gen = Generator(ModelRunner(cfg, params_for(cfg)), Sampling(temperature=0))
    free = gen.generate([[1, 2, 3], [4, 5]], 8)
    stop = free[0][2]  # the third token row 0 produces greedily
    streamed = []
    out = gen.generate([[1, 2, 3], [4, 5]], 8, stop_ids=[stop], on_tokens=streamed.append)
    first = free[0].index(stop)
    assert out[0] == free[0][:first + 1]  # stops right after the stop token
    assert len(out[1]) == (free[1].index(stop) + 1 if stop in free[1] else 8)
    assert [s[0] for s in streamed if s[0] is not None] == out[0]


def test_left_pad_positions_and_segments():
    tokens, positions, segments, lengths = left_pad([[7, 8, 9], [5]], pad_id=0)
    assert tokens.tolist() == [[7, 8, 9], [0, 0, 5]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]] and segments.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert lengths.tolist() == [3, 1]


def test_decoding_with_other_params_needs_no_new_generator():
    """What a policy being trained needs: the same jitted steps, the params given at each call."""
    cfg = tiny()
    params, other = params_for(cfg), params_for(cfg, seed=1)
    shared = Generator(ModelRunner(cfg, params), Sampling(temperature=0))
    prompts = [[5, 9, 11], [8, 4]]
    alone = Generator(ModelRunner(cfg, other), Sampling(temperature=0)).generate(prompts, 6)
    assert shared.generate(prompts, 6, params=other) == alone
    assert shared.generate(prompts, 6) != shared.generate(prompts, 6, params=other)
    assert shared._prefill._cache_size() == shared._step._cache_size() == 1  # one compilation for both params


@pytest.mark.slow
def test_sample_cli_streams_a_continuation(tiny_export, capsys):
    argv = ["sample", "--checkpoint", str(tiny_export), "--prompt", "the cat", "--max-tokens", "12",
            "--temperature", "0"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("the cat") and len(first.strip()) > len("the cat")
    assert main(argv) == 0 and capsys.readouterr().out == first  # greedy: the same text again


@pytest.mark.slow
def test_chat_cli_answers_through_stdin(tiny_export, capsys, monkeypatch):
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("the dog sees\nand then?\n\n"))
    assert main(["chat", "--checkpoint", str(tiny_export), "--max-tokens", "8", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("you> ") == 3 and out.count("model> ") == 2
    answers = [part.split("\n")[0] for part in out.split("model> ")[1:]]
    assert all(a.strip() for a in answers), out


@pytest.mark.parametrize("command, flags, message", [
    ("sample", ["--top-p", "1.5"], "--top-p=1.5: must be in (0, 1]"),
    ("sample", ["--top-p", "0"], "--top-p=0.0: must be in (0, 1]"),
    ("sample", ["--temperature", "-1"], "--temperature=-1.0: must be a finite number >= 0"),
    ("sample", ["--temperature", "nan"], "--temperature=nan: must be a finite number >= 0"),
    ("sample", ["--top-k", "-3"], "--top-k=-3: must be >= 0"),
    ("sample", ["--max-tokens", "0"], "--max-tokens=0: must be >= 1"),
    ("sample", ["--prompt", ""], "--prompt='': must be non-empty text"),
    ("chat", ["--top-p", "1.5"], "--top-p=1.5: must be in (0, 1]"),
    ("chat", ["--max-tokens", "-2"], "--max-tokens=-2: must be >= 1"),
])
def test_bad_generation_flags_are_one_line_before_the_checkpoint_is_read(tmp_path, capsys, command, flags, message):
    prompt = ["--prompt", "the cat"] if command == "sample" else []
    assert main([command, "--checkpoint", str(tmp_path / "missing"), *prompt, *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"llm-jax: error: {message}"), err  # not the missing checkpoint


def test_check_sampling_names_the_settings_as_the_caller_spells_them():
    ppo = lambda field: f"ppo.{field}"
    with pytest.raises(ConfigError, match=r"^ppo\.top_p=1\.5: must be in \(0, 1\]"):
        check_sampling(Sampling(top_p=1.5), 10, name=ppo)
    with pytest.raises(ConfigError, match=r"^ppo\.max_tokens=0: must be >= 1$"):
        check_sampling(Sampling(), 0, name=ppo)
    names = {"temperature": "rollout.temp", "top_k": "rollout.k"}
    with pytest.raises(ConfigError, match=r"^rollout\.k=62: must be in \[0, 61\], the vocabulary size"):
        check_sampling(Sampling(top_k=62), 10, model=tiny(), name=names.__getitem__)
    check_sampling(Sampling(temperature=0, top_k=VOCAB, top_p=1.0), 1, model=tiny(), prompt="x")


def test_check_sampling_bounds_max_tokens_by_learned_positions_only():
    learned = gpt2(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=16)
    check_sampling(Sampling(), 16, model=learned)
    with pytest.raises(ConfigError, match=r"^--max-tokens=17: must be in \[1, 16\], the model's max_seq_len$"):
        check_sampling(Sampling(), 17, model=learned)
    check_sampling(Sampling(), 10_000, model=tiny(max_seq_len=16))  # RoPE: no position table to run past


def test_generate_and_sample_report_an_empty_prompt_or_no_tokens_as_config_errors():
    """Library callers get the same one-line errors as the CLI, before anything is compiled or printed."""
    import io
    from llm_jax.inference.stream import sample
    gen = Generator(ModelRunner(tiny(), {"unused": jnp.zeros(1)}))  # the checks come before the params are used
    for prompts, max_new_tokens, message in (([[1, 2]], 0, "max_new_tokens=0: must be >= 1"),
                                             ([[1, 2], []], 4, "prompt 1 is empty"),
                                             ([], 4, "no prompts")):
        with pytest.raises(ConfigError, match=message):
            gen.generate(prompts, max_new_tokens)

    class Tokens:  # encodes every text as its characters' codes
        encode = encode_prompt = staticmethod(lambda text: [ord(c) for c in text])

    out = io.StringIO()
    with pytest.raises(ConfigError, match="encodes to no tokens"):
        sample(gen, Tokens(), "", 4, 0, out=out)
    with pytest.raises(ConfigError, match="max_tokens=0: must be >= 1"):
        sample(gen, Tokens(), "hi", 0, 0, out=out)
    assert out.getvalue() == ""


@pytest.mark.slow
def test_sample_cli_checks_top_k_against_the_models_vocabulary(tiny_export, capsys):
    assert main(["sample", "--checkpoint", str(tiny_export), "--prompt", "the cat", "--top-k", "321"]) == 2
    assert capsys.readouterr().err == ("llm-jax: error: --top-k=321: must be in [0, 320], the vocabulary size "
                                       "(0: off)\n")


def test_sample_cli_names_a_bad_checkpoint_dir(tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    assert "neither a run directory with checkpoints" in capsys.readouterr().err


def test_chat_survives_an_empty_answer():
    import io
    from llm_jax.inference.stream import chat

    class Silent:  # a generator that answers with the end-of-turn token straight away
        def generate(self, prompts, max_new_tokens, **kw):
            return [[END]]

    from llm_jax.data.tokenizer import train_tokenizer
    import tempfile, pathlib
    with tempfile.TemporaryDirectory() as d:
        tok = train_tokenizer(["hello world, how are you today? " * 50], pathlib.Path(d) / "t", 300)
    END = tok.specials["<|end|>"]
    out = io.StringIO()
    dialogue = chat(Silent(), tok, 5, 0, inp=io.StringIO("hi\nagain\n\n"), out=out)
    assert out.getvalue().count("(no answer)") == 2 and dialogue == []


@pytest.mark.slow
def test_generation_on_a_mesh_matches_one_device():
    from llm_jax.parallel import sharding
    from llm_jax.config import MeshConfig
    cfg = tiny(vocab_size=64, n_heads=4, n_kv_heads=2)
    params = params_for(cfg)
    boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), *(jnp.zeros((1, 8), jnp.int32),) * 3))
    mesh = sharding.make_mesh(MeshConfig(2, 2, 2))
    on_mesh = jax.device_put(params, sharding.tree_shardings(nn.get_partition_spec(boxed)["params"], mesh))
    prompts = [[5, 9, 11, 3], [8, 4], [30, 31, 32], [7]]
    alone = Generator(ModelRunner(cfg, params), Sampling(temperature=0)).generate(prompts, 6)
    sharded = Generator(ModelRunner(cfg, on_mesh), Sampling(temperature=0))
    assert sharded.generate(prompts, 6) == alone
    assert len(jax.tree.leaves(on_mesh)[0].sharding.device_set) == 8


def test_sample_rows_draws_each_row_by_its_own_settings_and_key_whatever_its_neighbours():
    from llm_jax.inference.generate import sample_rows
    logits = jax.random.normal(jax.random.key(1), (4, 50)) * 3
    keys = jax.random.split(jax.random.key(2), 4)
    temperature, top_k, top_p = jnp.array([0.0, 1.0, 1.0, 0.7]), jnp.array([0, 1, 0, 5]), jnp.array([1.0, 1.0, 0.9, 1.0])
    tokens = np.asarray(sample_rows(logits, keys, temperature, top_k, top_p))
    best = np.asarray(jnp.argmax(logits, -1))
    assert tokens[0] == best[0] and tokens[1] == best[1]  # greedy, and top-k 1 at temperature 1
    assert tokens[3] in set(np.asarray(jax.lax.top_k(logits[3], 5)[1]).tolist())
    for row in range(4):  # alone, or beside rows with other logits and settings: the same token
        alone = sample_rows(logits[row:row + 1], keys[row:row + 1], temperature[row:row + 1], top_k[row:row + 1],
                            top_p[row:row + 1])
        assert int(alone[0]) == tokens[row], row
    all_greedy = sample_rows(logits, keys, jnp.zeros(4), top_k, top_p)  # no row samples: the draw is skipped
    np.testing.assert_array_equal(np.asarray(all_greedy), best)
