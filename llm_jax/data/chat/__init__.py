"""Conversations: the chat template (template.py), dialogue sources (dialogue.py), packed SFT rows (sft.py),
preference pairs (pairs.py) and their rendering for reward models (preference.py), and what preparing both
shares (prepared.py)."""
