"""SFT end to end: pretrain, export, fine-tune on a few dialogues, answer them greedily."""
import json

from test_train import tiny_args

from llm_jax.checkpoint import load_for_inference
from llm_jax.cli import main
from llm_jax.data.chat_template import render_prompt
from llm_jax.data.dialogue import Message
from llm_jax.generate import Generator, Sampling

QA = [("what is the capital of france?", "paris."), ("what color is the sky?", "blue, mostly."),
      ("how many legs has a cat?", "four."), ("say hello", "hello to you!")]


def test_fine_tuned_model_reproduces_its_answers_greedily(tmp_path, capsys):
    assert main(tiny_args(tmp_path, "--set", "train.steps=20", "--set", "train.eval_every=1000")) == 0
    export = tmp_path / "export"
    assert main(["export", "--run-dir", str(tmp_path / "run"), "--out", str(export)]) == 0
    dialogues = tmp_path / "dialogues.jsonl"
    lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
             for q, a in QA] * 10
    dialogues.write_text("\n".join(lines) + "\n")
    capsys.readouterr()  # only the SFT run's output below
    sft_run = tmp_path / "sft"
    assert main(["train", "--config", "sft_tiny", "--run-dir", str(sft_run), "--set",
                 f"data.sources=chat:{dialogues}", "--set", f"checkpoint.init_from={export}",
                 "--set", "train.steps=150", "--set", "train.eval_every=1000"]) == 0
    out = capsys.readouterr().out
    assert "assistant tokens to train on" in out and "gzip" not in out  # SFT scores answers, no compressors

    cfg, params, tok = load_for_inference(sft_run)
    gen = Generator(cfg.model, params, Sampling(temperature=0))
    end = tok.special_ids["<|end|>"]
    prompts = [render_prompt([Message("user", q)], tok).tolist() for q, _ in QA]
    answers = gen.generate(prompts, 16, stop_ids=[end, tok.eos_id])
    for (q, expected), answer in zip(QA, answers):
        assert answer[-1] == end, (q, tok.decode(answer))
        assert tok.decode(answer[:-1]) == expected, q


def test_sft_without_a_tokenizer_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--config", "sft_tiny", "--run-dir", str(tmp_path / "run"),
                 "--set", f"data.sources=chat:{tmp_path}/x.jsonl"]) == 2
    assert "needs the pretrained model's tokenizer" in capsys.readouterr().err
