"""The training engine: strategy (local / DDP), schedule, the trainer loop."""
