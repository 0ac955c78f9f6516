"""The whole recipe on the embedded default, in about 7 minutes on 2 CPU cores:

    llm-jax pipeline instructgpt_tiny          # runs/pipelines/instructgpt_tiny/report.md at the end

1. pretrain: `pretrain_tiny` as shipped (the Python standard library, whole modules held out; 210 s of training);
2. sft: its export fine-tuned on oasst1's English dialogues (the shared `sft_oasst1_en`), loss on the answers;
3. rm: a reward model from the SFT export on Anthropic's hh-rlhf comparisons (`pref_hh_rlhf`);
4. ppo: the SFT policy optimised against that reward model, with a KL leash to the SFT model, on hh prompts;
   dpo (off: `--set dpo.enabled=true`) optimises the SFT policy on the same pairs directly.
The report card puts every stage's figures, benchmarks and answers side by side. A model this small that has
read Python, then a few hundred dialogues, answers poorly: the card measures the path, it does not flatter it.
"""
from llm_jax.pipeline.plan import Card, Pipeline, Stage

CHAT = ("data.seq_len=128", "data.eval_fraction=0.1")  # the pretraining context: RoPE is trained that far


def pipeline() -> Pipeline:
    return Pipeline(stages=(
        Stage("pretrain", "pretrain_tiny"),
        # 188 dialogues make 156 rows of 128 tokens: 30 steps are 3 epochs. Held-out bits/byte on the answers is
        # lowest near there (2.64 at step 20, 2.65 at 30) and then rises as the model learns them by heart
        # (2.80 at step 80, 3.53 at 150).
        Stage("sft", "sft_tiny", (*CHAT, "data.sources=oasst:sft_oasst1_en/*.jsonl.gz", "train.steps=30",
                                  "train.batch_size=16", "train.eval_every=15", "optim.learning_rate=3e-3",
                                  "checkpoint.every=15"), init_from="pretrain"),
        Stage("rm", "rm_tiny", (*CHAT, "data.sources=hh:pref_hh_rlhf/*.jsonl.gz", "train.steps=60",
                                "train.eval_every=30", "optim.learning_rate=1e-3"), init_from="sft"),
        Stage("ppo", "ppo_tiny", (*CHAT, "data.sources=hh:pref_hh_rlhf/*.jsonl.gz", "train.steps=32",
                                  "train.eval_every=16", "checkpoint.every=16", "rl.max_answer_tokens=32",
                                  "rl.value_init=reward_model"), init_from="sft", reward_model="rm"),
        Stage("dpo", "dpo_tiny", (*CHAT, "data.sources=hh:pref_hh_rlhf/*.jsonl.gz", "train.steps=60",
                                  "train.eval_every=30"), init_from="sft", enabled=False),
    ), card=Card(tasks=("blimp", "piqa"), shots=(0, 5), limit=200, judge="rm", baseline="sft",
                 compare_prompts="hh:pref_hh_rlhf/*.jsonl.gz", compare_samples=64, max_tokens=32))
