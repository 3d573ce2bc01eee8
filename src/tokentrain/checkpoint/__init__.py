"""Checkpoints (atomic step_N + latest pointer, resume) and the final Hugging Face export."""
