"""Training metrics: FLOPs per document, JSONL + TensorBoard + progress bar, plots."""
