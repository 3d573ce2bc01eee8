"""The training loop and its parts: data stream, schedule, evaluation, preemption, the trainer."""
