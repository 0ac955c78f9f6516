from setuptools import find_packages, setup

setup(
    name="llm_jax",
    version="0.1.0",
    description="Decoder-only language models in JAX: pretraining, SFT and reward models, reported as compression",
    packages=find_packages(include=["llm_jax", "llm_jax.*"]),
    package_data={"llm_jax.serve": ["static/*.html"]},  # the chat page `llm-jax serve` serves at /
    python_requires=">=3.11",
    # Ranges pin what was tested: jax, flax, orbax and grain change APIs between minor releases.
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "sentencepiece>=0.2.1,<0.3",
        "tensorboard>=2.21,<2.22",
        "numpy>=2.0,<3",
        "tqdm>=4.66,<5",
        "matplotlib>=3.11,<3.12",
        "absl-py>=2.5,<3",
    ],
    extras_require={
        # The server's tests drive it with the official OpenAI client, and its chat page with Selenium (in Debian's
        # Chromium: `apt-get install chromium chromium-driver`).
        "test": ["pytest>=9,<10", "pytest-xdist>=3.8,<4", "openai>=3.57,<3.58", "selenium>=4.51,<4.52"],
        "serve": ["starlette>=1.10,<1.11", "uvicorn>=0.54,<0.55"],  # llm-jax serve (llm_jax/serve/)
        "torch": ["torch==2.13.0"],  # benchmarks/torch_reference.py
        # Hugging Face checkpoints (llm_jax/interop/) and the parity tests against transformers
        "hf": ["safetensors>=0.8,<0.9", "tokenizers>=0.23,<0.24", "transformers>=5.23,<5.24", "torch==2.13.0",
               "peft>=0.21.2,<0.22"],
    },
    entry_points={"console_scripts": ["llm-jax=llm_jax.cli.main:main"]},
)
