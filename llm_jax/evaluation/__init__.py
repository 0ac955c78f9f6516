"""What a model says about text: bits per byte of any text (text.py) beside general-purpose compressors
(baselines.py)."""
