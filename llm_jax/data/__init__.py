"""Data, from files to batches: corpus readers (corpus.py), tokenizers (tokenizer.py, byte_bpe.py over
pieces.py), prepared directories on disk (shards.py), pretraining's token shards (prepare.py), every task's
batch types (batches.py), grain batches per process (pipeline.py), and chat/ for dialogues and preference
pairs rendered through the chat template."""
