"""Old names of the engines (now in tokentrain.engines), kept for code written against them."""

from tokentrain.engines.ddp import DDPEngine as DDPStrategy
from tokentrain.engines.local import MODEL_FILE, OPTIMIZER_FILE
from tokentrain.engines.local import LocalEngine as LocalStrategy

__all__ = ["MODEL_FILE", "OPTIMIZER_FILE", "DDPStrategy", "LocalStrategy"]
