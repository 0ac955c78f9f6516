"""The English recipe the notes measure, sized for one GPU node (8 GPUs; on 2 CPU cores it takes hours):

    llm-jax pipeline instructgpt_en --launcher slurm --nodes 1 --gpus-per-node 8 --setup 'source .venv/bin/activate'

1. pretrain: `pretrain_gutenberg` (a 512-wide, 8-layer Llama on 90 Project Gutenberg books, 20,000 steps);
2. sft: `sft_dialogue` from it (MOSS and oasst1 dialogues, loss on the answers);
3. rm: `rm_hh_rlhf` from the SFT export (hh-rlhf comparisons);
4. ppo: `ppo_hh`, the SFT policy against that reward model; dpo: `dpo_hh` from the SFT export, on the same pairs;
5. round two (off: `--set compare2.enabled=true --set rm2.enabled=true --set ppo2.enabled=true`): the PPO
   policy and the SFT policy answer the hh training prompts, the first reward model judges each pair, a second
   reward model learns those comparisons, and PPO goes on from the first PPO policy against it. People's labels
   replace the judge: `--set rm2.enabled=true --set ppo2.enabled=true --set rm2.data.sources=pairs:LABELS.jsonl`
   (compare2 left off: a data.sources given explicitly wins over rm2's pairs_from).
"""
from llm_jax.pipeline.plan import Card, Comparisons, Pipeline, Stage


def pipeline() -> Pipeline:
    return Pipeline(stages=(
        Stage("pretrain", "pretrain_gutenberg"),
        Stage("sft", "sft_dialogue", init_from="pretrain"),
        Stage("rm", "rm_hh_rlhf", init_from="sft"),
        Stage("ppo", "ppo_hh", init_from="sft", reward_model="rm"),
        Stage("dpo", "dpo_hh", init_from="sft"),
        Comparisons("compare2", policy="ppo", baseline="sft", judge="rm", prompts="hh:pref_hh_rlhf/*.jsonl.gz",
                    samples=1024, enabled=False),
        Stage("rm2", "rm_hh_rlhf", init_from="sft", pairs_from="compare2", enabled=False),
        Stage("ppo2", "ppo_hh", init_from="ppo", reward_model="rm2", enabled=False),
    ), card=Card(tasks=("blimp", "piqa", "truthfulqa_mc", "gsm8k"), shots=(0, 5), limit=1000, judge="rm",
                 baseline="sft", compare_prompts="hh:pref_hh_rlhf/*.jsonl.gz", compare_samples=256,
                 max_tokens=128))
