"""The model's size and shape from its config.json alone: built on the meta device (no weights,
no memory), so the parameter count is the model's own, tied tensors counted once."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class ModelShape:
    model_type: str
    params: int  # every parameter, tied tensors once (what the run's "model:" line counts)
    matmul_params: int  # those that multiply activations (FLOPs per token: metrics/flops.py)
    largest_layer_params: int  # one decoder layer, or the embedding if larger (an FSDP unit, a ZeRO-3 gather)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int  # key/value width: kv heads x head dim (grouped-query attention)
    attn_dim: int  # heads x head dim
    vocab: int
    fused_loss: bool  # logits never materialise whole (model/lm.py: the fused loss head)
    published_dtype: str  # config.json's dtype: what export_dtype = 'auto' writes

    def as_dict(self) -> dict:
        return asdict(self)


def is_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).expanduser().exists()


def read_local_config(path: str, trust_remote_code: bool):
    """(the model's HF config, None) or (None, why it is unknown). A local folder is read as the
    run reads it (a broken config.json is the run's one-line ConfigError); a hub id only from
    the local Hugging Face cache: the plan makes no network call."""
    if is_local(path):
        from tokentrain.model.lm import read_config

        return read_config(path, trust_remote_code), None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True), None
    except Exception:  # not in the cache (or its code is not): unknown, said so
        return None, f"{path!r} is a hub id whose config.json is not in the local Hugging Face cache"


def model_shape(path: str, trust_remote_code: bool) -> tuple[ModelShape | None, str | None]:
    """(the shape, None), or (None, why the model's size is unknown)."""
    config, why = read_local_config(path, trust_remote_code)
    if config is None:
        return None, why
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from tokentrain.metrics.flops import FlopCounter
    from tokentrain.model.lm import fused_parts

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                copy.deepcopy(config),
                dtype=torch.float32,
                attn_implementation="eager",
                trust_remote_code=trust_remote_code,
            )
        model.tie_weights()
    except Exception as e:
        from tokentrain.errors import first_line

        return None, f"transformers cannot build {path!r} from its config ({first_line(e)})"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    flops = FlopCounter.for_model(model)
    emb = model.get_input_embeddings().weight
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    layer_params = max((sum(p.numel() for p in m.parameters()) for m in layers), default=0)
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // max(1, heads))
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    return (
        ModelShape(
            model_type=str(getattr(config, "model_type", type(model).__name__)),
            params=sum(p.numel() for p in model.parameters()),
            matmul_params=flops.matmul_params,
            largest_layer_params=max(layer_params, emb.numel()),
            layers=flops.layers,
            hidden=int(text.hidden_size),
            intermediate=int(getattr(text, "intermediate_size", 0) or 4 * text.hidden_size),
            heads=heads,
            kv_dim=kv_heads * head_dim,
            attn_dim=flops.attn_dim,
            vocab=int(emb.shape[0]),
            fused_loss=fused_parts(model) is not None,
            published_dtype=str(getattr(config, "dtype", None) or "float32").replace("torch.", ""),
        ),
        None,
    )
