"""Data: corpus readers (corpus.py), the sentencepiece tokenizer (tokenizer.py), tokenization into shards
(prepare.py) and packed, per-process batches (pipeline.py)."""
