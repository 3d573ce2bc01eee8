"""model/init.py: initial weights keyed by (seed, name) -- not by build order, device or how the
model is cut into parts -- tied weights initialised once, a folder with weights left as it is."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import config_only
from tokentrain.model.init import digest, init_by_name, module_seed
from tokentrain.model.lm import load_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tokentrain.model.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("init")
    built = make_tiny_model(root / "built", vocab_size=300, hidden_size=16, layers=2, heads=2,
                            tie_word_embeddings=True)  # fmt: skip
    scratch = config_only(built, root / "scratch")
    return built, scratch


def _build(folder, seed: int = 7):
    return load_model(str(folder), False, "sdpa", torch.device("cpu"), seed=seed)


def _meta(folder):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)


def test_module_seed_is_stable_and_depends_on_both():
    assert module_seed(7, "model.layers.0.mlp") == module_seed(7, "model.layers.0.mlp")
    assert len({module_seed(7, "a"), module_seed(8, "a"), module_seed(7, "b")}) == 3
    assert module_seed(0, "") == 6049415832621938404  # a fixed value: no Python hash() randomisation


def test_same_weights_whatever_the_order_and_parts_and_tied_once(folders):
    """The FSDP2 way (on meta, allocated and initialised a layer at a time, last layer first)
    gives the weights of the whole build; lm_head stays the embedding, its padding row zero."""
    from tokentrain.engines.fsdp2 import _materialize, decoder_layers

    whole = _build(folders[1])
    parted = _meta(folders[1])
    samples: dict[str, bytes] = {}

    def init(modules):
        samples.update(init_by_name(parted, 7, modules))

    layers = decoder_layers(parted)
    for layer in reversed(layers):
        _materialize(list(layer.modules()), torch.device("cpu"), init)
    inside = {id(m) for layer in layers for m in layer.modules()}
    _materialize([m for m in parted.modules() if id(m) not in inside], torch.device("cpu"), init)

    a, b = whole.state_dict(), parted.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for m in (whole, parted):
        assert m.lm_head.weight is m.model.embed_tokens.weight
        assert not m.model.embed_tokens.weight[0].any()  # the padding row (pad_token_id 0)
    assert digest(samples) == digest(init_by_name(whole, 7))
    assert digest(init_by_name(whole, 8)) != digest(samples)


def test_draws_do_not_depend_on_dtype_and_leave_the_callers_rng_alone(folders):
    ref = _build(folders[1]).state_dict()
    half = _meta(folders[1]).to_empty(device="cpu")
    half.tie_weights()  # to_empty gives each module its own tensor
    half = half.to(torch.bfloat16)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    init_by_name(half, 7)
    assert torch.equal(torch.rand(3), before)
    for k, v in half.state_dict().items():
        assert torch.equal(v, ref[k].to(torch.bfloat16)), k


def test_a_folder_with_weights_is_loaded_as_it_is(folders):
    from safetensors.torch import load_file

    model = _build(folders[0])
    saved = load_file(str(folders[0] / "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
