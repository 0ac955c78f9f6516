"""`llm-jax pipeline`: the whole recipe, pretrain → SFT → reward model → PPO/DPO → evaluation, as one command.

  plan.py  pipeline files (stages, their wiring export to export, the report card's settings), validation
  run.py   the stages in order through a launcher, skipped when finished and resumed when interrupted
  card.py  the report card's evaluations (cached per stage) and the Comparisons stages' pairs
  card_report.py  the card's Markdown and PNGs: every stage's figures, benchmarks, win rates and answers
"""
