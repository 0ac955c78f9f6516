"""Running a trained model: one path through runner.py for KV-cache generation (generate.py), sample and chat
(stream.py), reward scores (score.py) and lossless compression (codec.py over arithmetic.py)."""
