"""SFT end to end: fine-tune the tiny pretrained export on a few dialogues, answer them greedily."""
import json

import pytest

from llm_jax.cli.main import main
from llm_jax.data.chat.dialogue import Message
from llm_jax.data.chat.template import render_prompt
from llm_jax.inference.generate import Generator, Sampling
from llm_jax.inference.runner import ModelRunner
from llm_jax.train.export import load_for_inference

QA = [("what is the capital of france?", "paris."), ("what color is the sky?", "blue, mostly."),
      ("how many legs has a cat?", "four."), ("say hello", "hello to you!")]


@pytest.mark.slow
def test_fine_tuned_model_reproduces_its_answers_greedily(tmp_path, capsys, tiny_export):
    dialogues = tmp_path / "dialogues.jsonl"
    lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
             for q, a in QA] * 10
    dialogues.write_text("\n".join(lines) + "\n")
    capsys.readouterr()  # only the SFT run's output below
    sft_run = tmp_path / "sft"
    assert main(["train", "--config", "sft_tiny", "--run-dir", str(sft_run), "--set",
                 f"data.sources=chat:{dialogues}", "--set", f"checkpoint.init_from={tiny_export}",
                 "--set", "train.steps=90", "--set", "train.eval_every=1000"]) == 0
    out = capsys.readouterr().out
    assert "assistant tokens to train on" in out and "gzip" not in out  # SFT scores answers, no compressors

    cfg, params, tok = load_for_inference(sft_run)
    gen = Generator(ModelRunner(cfg.model, params), Sampling(temperature=0))
    end = tok.specials["<|end|>"]
    prompts = [render_prompt([Message("user", q)], tok).tolist() for q, _ in QA]
    answers = gen.generate(prompts, 16, stop_ids=[end, tok.eos_id])
    for (q, expected), answer in zip(QA, answers):
        assert answer[-1] == end, (q, tok.decode(answer))
        assert tok.decode(answer[:-1]) == expected, q


def test_sft_without_a_tokenizer_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--config", "sft_tiny", "--run-dir", str(tmp_path / "run"),
                 "--set", f"data.sources=chat:{tmp_path}/x.jsonl"]) == 2
    assert "needs the pretrained model's tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything is written
