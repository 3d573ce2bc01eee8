"""Training configuration: Python config files -> one validated `TrainConfig`."""

from tokentrain.config.loader import load_config
from tokentrain.config.schema import TrainConfig

__all__ = ["TrainConfig", "load_config"]
