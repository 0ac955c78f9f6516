"""A tiny PPO run for tests and smoke checks, on any policy export, reward model and prompts:
    llm-jax train --config ppo_tiny --set checkpoint.init_from=POLICY_EXPORT \
        --set rl.reward_model=RM_RUN_OR_EXPORT --set data.sources=prompts:FILE.jsonl
The model and tokenizer come from the policy export, which is also the frozen reference; the value model
starts from the reward model's trunk (rl.value_init=policy: from the policy's)."""
from llm_jax.config import CheckpointConfig, Config, DataConfig, OptimConfig, RLConfig, TrainConfig, llama


def config() -> Config:
    return Config(
        name="ppo_tiny",
        task="rl",
        model=llama(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, scan_layers=False),
        data=DataConfig(sources=("prompts:prompts.jsonl",), seq_len=64, eval_fraction=0.2),
        # Evaluation samples as the rollouts do (eval_temperature=1.0), so one compiled sampler serves both.
        rl=RLConfig(algorithm="ppo", prompts_per_rollout=8, samples_per_prompt=2, epochs=2, max_answer_tokens=16,
                    kl_coef=0.05, eval_prompts=8,
                    eval_temperature=1.0),
        optim=OptimConfig(learning_rate=3e-4, warmup_steps=2, weight_decay=0.0),
        # 16 answers per rollout in minibatches of 8, 2 epochs: a rollout every 4 steps.
        train=TrainConfig(steps=16, batch_size=8, eval_every=8, log_every=1),
        checkpoint=CheckpointConfig(every=8),
    )
