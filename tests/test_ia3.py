"""(IA)³: defaults, maths, merge/unmerge, mixed batch, files, PEFT interop, parameter counts."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file

from deltatune import IA3Config, PeftModel, get_peft_model
from deltatune.methods.ia3 import IA3Layer
from helpers import llama3_8b_meta, tiny_wide, trainable_report


def ids(batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(1))


def run(model: torch.nn.Module, x: torch.Tensor, **kw: object) -> torch.Tensor:
    extra = (
        {"decoder_input_ids": x}
        if "T5" in type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
        else {}
    )
    with torch.no_grad():
        out = model(input_ids=x, **extra, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def randomise(model: torch.nn.Module, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


KINDS = ["llama", "gpt2", "bert", "t5"]
EXPECTED = {  # module leaf → feed-forward?, as the issue lists the defaults
    "llama": {"k_proj": False, "v_proj": False, "down_proj": True},
    "gpt2": {"c_attn": False, "c_proj": True},
    "bert": {"key": False, "value": False, "dense": True},
    "t5": {"k": False, "v": False, "wo": True},
}


@pytest.mark.parametrize("kind", KINDS)
def test_default_targets_and_shapes(kind: str) -> None:
    model = get_peft_model(tiny_wide(kind), IA3Config())
    layers = {p: m for p, m in model.get_base_model().named_modules() if isinstance(m, IA3Layer)}
    assert layers
    for path, layer in layers.items():
        leaf = path.split(".")[-1]
        assert layer.is_feedforward == EXPECTED[kind][leaf], path
        shape = (1, layer.in_features) if layer.is_feedforward else (layer.out_features, 1)
        assert tuple(layer.ia3_l["default"].shape) == shape
    if kind == "gpt2":  # attn.c_proj is not the FFN's c_proj
        assert not any(p.endswith("attn.c_proj") for p in layers)
    if kind == "llama":
        assert sorted({p.split(".")[-1] for p in layers}) == ["down_proj", "k_proj", "v_proj"]


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_adapter_changes_nothing(kind: str) -> None:
    ref = run(tiny_wide(kind), ids())
    torch.testing.assert_close(run(get_peft_model(tiny_wide(kind), IA3Config()), ids()), ref)


def test_forward_formula_on_one_layer() -> None:
    model = get_peft_model(tiny_wide("llama"), IA3Config())
    randomise(model)
    k = model.get_base_model().get_submodule("model.layers.0.self_attn.k_proj")
    down = model.get_base_model().get_submodule("model.layers.0.mlp.down_proj")
    x = torch.randn(2, 3, 64)
    h = torch.randn(2, 3, 128)
    with torch.no_grad():
        torch.testing.assert_close(k(x), k.base_layer(x) * k.ia3_l["default"].flatten())
        torch.testing.assert_close(down(h), down.base_layer(h * down.ia3_l["default"].flatten()))


def test_llama3_8b_parameter_report() -> None:
    model = get_peft_model(llama3_8b_meta(), IA3Config())
    assert (
        trainable_report(model)
        == "trainable params: 524,288 || all params: 8,030,785,536 || trainable%: 0.0065"
    )


def test_unmerge_with_zero_entries_is_a_clear_error() -> None:
    model = get_peft_model(tiny_wide("llama"), IA3Config())
    layer = model.get_base_model().get_submodule("model.layers.0.self_attn.v_proj")
    with torch.no_grad():
        layer.ia3_l["default"][3] = 0.0
    model.merge_adapter()
    with pytest.raises(ValueError, match="zero entr.*cannot be divided back"):
        model.unmerge_adapter()
    assert layer.merged  # left as it was: still merged, not half-undone


def test_multiple_adapters_multiply() -> None:
    model = get_peft_model(tiny_wide("llama"), IA3Config())
    randomise(model, 1)
    model.add_adapter("b", IA3Config())
    randomise(model, 2)  # randomises both
    layer = model.get_base_model().get_submodule("model.layers.0.self_attn.k_proj")
    layer.set_adapter(["default", "b"])
    x = torch.randn(1, 2, 64)
    with torch.no_grad():
        expected = layer.base_layer(x) * layer.ia3_l["default"].flatten() * layer.ia3_l["b"].flatten()
        torch.testing.assert_close(layer(x), expected)


def test_trainable_vectors_and_their_count() -> None:
    model = get_peft_model(tiny_wide("llama"), IA3Config())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".ia3_l." in n for n in trainable)
    assert model.get_nb_trainable_parameters()[0] == 2 * (32 + 32 + 128)  # k, v (2 KV heads x 16), down


def test_feedforward_not_subset_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="subset of target_modules.*'down_proj'"):
        IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="without target_modules"):
        IA3Config(feedforward_modules=["down_proj"])


def test_unknown_architecture_needs_targets() -> None:
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    with pytest.raises(ValueError, match="no default target modules.*feedforward_modules"):
        get_peft_model(mlp, IA3Config())
    model = get_peft_model(mlp, IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    assert model.get_base_model()[2].is_feedforward and not model.get_base_model()[0].is_feedforward


def test_weighted_combination_of_vectors() -> None:
    model = get_peft_model(tiny_wide("llama"), IA3Config())
    model.add_adapter("b", IA3Config())
    randomise(model)
    model.add_weighted_adapter(["default", "b"], [0.7, 0.3], "mix")
    for module in model.get_base_model().modules():
        if isinstance(module, IA3Layer):
            expected = 0.7 * module.ia3_l["default"] + 0.3 * module.ia3_l["b"]
            torch.testing.assert_close(module.ia3_l["mix"], expected)
    with pytest.raises(ValueError, match="combine linearly only"):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix2", combination_type="svd")


def test_module_to_save_is_not_also_a_target(tmp_path) -> None:
    """A module both targeted and in modules_to_save is trained whole, with no vector inside
    (PEFT's rule): same trainable count and file keys as PEFT, and files load both ways."""
    settings = {
        "target_modules": ["k_proj", "v_proj", "down_proj", "lm_head"],
        "feedforward_modules": ["down_proj"],
        "modules_to_save": ["lm_head"],
    }
    ours = get_peft_model(tiny_wide("llama"), IA3Config(**settings))
    theirs = peft.get_peft_model(tiny_wide("llama"), peft.IA3Config(**settings))
    assert not isinstance(ours.get_base_model().lm_head.original_module, IA3Layer)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    randomise(ours)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    )
    loaded = peft.PeftModel.from_pretrained(tiny_wide("llama"), tmp_path / "ours").eval()
    torch.testing.assert_close(run(loaded, ids()), run(ours, ids()), rtol=1e-5, atol=1e-5)
    back = PeftModel.from_pretrained(tiny_wide("llama"), tmp_path / "theirs")
    torch.testing.assert_close(run(back, ids()), run(theirs.eval(), ids()), rtol=1e-5, atol=1e-5)
