"""tokentrain: train causal LMs on pre-tokenized InternLM-format data."""

__version__ = "0.1.0"
