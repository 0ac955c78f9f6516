"""The Chinese recipe: pretraining on the shared Chinese text, SFT on Chinese dialogues through the `[SEP]`
template of the classic Chinese chat GPT-2 (`--set sft.data.chat_template=chatml` for ChatML), Chinese
benchmarks (CMMLU few-shot, SLING minimal pairs):

    llm-jax pipeline instructgpt_zh

The shared data has no Chinese comparisons, so the reward model and PPO wait for a pairs file of yours (JSONL of
{prompt, chosen, rejected}); one override supplies it and runs them:

    llm-jax pipeline instructgpt_zh --set rm.data.sources=pairs:/path/to/pairs.jsonl
"""
from llm_jax.pipeline.plan import Card, Pipeline, Stage


def pipeline() -> Pipeline:
    return Pipeline(stages=(
        Stage("pretrain", "pretrain_chinese"),
        Stage("sft", "sft_chinese", ("data.chat_template=sep",), init_from="pretrain"),
        Stage("rm", "rm_hh_rlhf", init_from="sft", waits_for="data.sources"),
        Stage("ppo", "ppo_hh", init_from="sft", reward_model="rm", data_from="rm"),  # the prompts of your pairs
    ), card=Card(tasks=("cmmlu", "sling"), shots=(0, 5), limit=1000, judge="rm", baseline="sft",
                 prompts=("中国的首都是哪里？", "请写一首关于春天的短诗。", "如何学好一门外语？"), max_tokens=64,
                 compare_prompts=""))  # "": the held-out prompts of the judge's pairs
