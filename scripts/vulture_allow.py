"""Reviewed vulture findings that are not dead code (read by `vulture`, never imported).

Each line names the thing and says why it stays. Add a line only after checking the finding:
truly dead code is deleted instead.
"""

# Bare attribute reads are how vulture learns a name is used.
# ruff: noqa: B018
from deepspeed.runtime.config import DeepSpeedConfig
from huggingface_hub import constants as hub_constants
from numpy import ndarray
from tokenizers import Tokenizer

from tokentrain.data import format as data_format
from tokentrain.data import index as data_index
from tokentrain.distributed.env import DistEnv
from tokentrain.engines import deepspeed, fsdp2
from tokentrain.model import varlen

data_format.inputs_and_targets  # the format spec's reference (inputs, targets) of a document; tests check it
data_index.build_index  # the one-call index builder; tests build indexes with it
data_index.IndexStats.built_metas  # counted while indexing; tests read it (metas built vs reused)
DistEnv.distributed  # world_size > 1; the engine test worker reads it
fsdp2.FSDP2Engine.owns_group  # whether the engine made the process group; tests check it
deepspeed.DeepSpeedEngine  # built by name from its row in engines/specs.py
varlen.varlen_attention.attention_mask  # transformers' attention-function parameter (some models pass it by name)
ndarray.flags.writeable  # numpy's array flag (data/packing.py sets it)
Tokenizer.pre_tokenizer  # the tokenizers library's attribute (model/tiny.py sets it)
DeepSpeedConfig.load_universal_checkpoint  # DeepSpeed's flag its load_checkpoint reads (engines/deepspeed.py sets it)
hub_constants.HF_HUB_OFFLINE  # huggingface_hub's offline switch: model/source.py sets it, transformers reads it
