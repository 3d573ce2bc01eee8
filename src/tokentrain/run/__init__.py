"""What makes one training run one run: its work dir (lock, fresh start or resume) and its signals."""
