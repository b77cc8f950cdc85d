"""The one-command quickstart: sample data, a tiny cached chat model, SFT warm-up,
GRPO with the inverse-rank grader, and a before/after evaluation (``run.py``)."""
