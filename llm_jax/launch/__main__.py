"""`python -m llm_jax.launch KIND ... -- LLM_JAX_ARGS...`, which the launch/KIND scripts run; see main.py."""
import sys

from llm_jax.launch.main import main

sys.exit(main())
