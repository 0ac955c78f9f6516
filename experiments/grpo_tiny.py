"""A tiny GRPO run for tests and smoke checks (no value model; 4 answers per prompt compared with each other):
    llm-jax train --config grpo_tiny --set checkpoint.init_from=POLICY_EXPORT \
        --set rl.reward_model=RM_RUN_OR_EXPORT --set data.sources=prompts:FILE.jsonl
rl.algorithm=rloo gives RLOO with the same settings."""
from llm_jax.config import CheckpointConfig, Config, DataConfig, OptimConfig, RLConfig, TrainConfig, llama


def config() -> Config:
    return Config(
        name="grpo_tiny",
        task="rl",
        model=llama(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, scan_layers=False),
        data=DataConfig(sources=("prompts:prompts.jsonl",), seq_len=64, eval_fraction=0.2),
        # GRPO's way: the KL as a k3 loss term, not in the reward.
        # Evaluation samples as the rollouts do (eval_temperature=1.0), so one compiled sampler serves both.
        rl=RLConfig(algorithm="grpo", prompts_per_rollout=4, samples_per_prompt=4, epochs=2, max_answer_tokens=16,
                    kl_coef=0.04, kl_estimator="k3", kl_penalty="loss", eval_prompts=8,
                    eval_temperature=1.0),
        optim=OptimConfig(learning_rate=3e-4, warmup_steps=2, weight_decay=0.0),
        train=TrainConfig(steps=16, batch_size=8, eval_every=8, log_every=1),
        checkpoint=CheckpointConfig(every=8),
    )
