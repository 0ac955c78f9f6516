"""Other ecosystems' checkpoints: Hugging Face GPT-2 and Llama in and out (hf.py, hf_params.py, safetensors_io.py)."""
