import sys

from llm_jax.cli.main import main

sys.exit(main())
