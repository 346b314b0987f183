"""Bottleneck adapters (Houlsby / Pfeiffer / parallel): placement, counts, files, errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    T5ForConditionalGeneration,
)

from deltatune import BottleneckConfig, PeftModel, get_peft_model
from deltatune.methods.bottleneck import BottleneckLayer
from helpers import assert_rows_match_alone, tiny_wide


def ids(batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(2, 128, (batch, seq), generator=torch.Generator().manual_seed(1))


def run(model: nn.Module, x: torch.Tensor, **kw: object) -> torch.Tensor:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    extra = {"decoder_input_ids": x} if isinstance(inner, T5ForConditionalGeneration) else {}
    with torch.no_grad():
        out = model(input_ids=x, **extra, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


KINDS = ["llama", "mistral", "qwen2", "gpt2", "bert", "roberta", "t5"]
SITES = {  # (attention sub-layer, FFN sub-layer) leaf names per architecture
    "llama": ("self_attn", "mlp"),
    "mistral": ("self_attn", "mlp"),
    "qwen2": ("self_attn", "mlp"),
    "gpt2": ("attn", "mlp"),
    "bert": ("attention.output", "output"),
    "roberta": ("attention.output", "output"),
    "t5": ("SelfAttention", "DenseReluDense"),
}


def sites(model: PeftModel) -> list[str]:
    return [p for p, m in model.get_base_model().named_modules() if isinstance(m, BottleneckLayer)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
def test_fresh_adapter_leaves_outputs_unchanged(kind: str, placement: str) -> None:
    ref = run(tiny_wide(kind), ids())
    model = get_peft_model(tiny_wide(kind), BottleneckConfig(bottleneck_size=8, placement=placement))
    torch.testing.assert_close(run(model, ids()), ref, rtol=0, atol=0)
    blocks = 2 if kind != "t5" else 4  # T5: encoder and decoder blocks
    per_block = 2 if placement == "houlsby" else 1
    if kind == "t5" and placement == "houlsby":
        per_block = 2  # self-attention of encoder and decoder blocks, and every FFN
    assert len(sites(model)) == blocks * per_block


@pytest.mark.parametrize("kind", KINDS)
def test_houlsby_sites_are_the_sublayers(kind: str) -> None:
    model = get_peft_model(tiny_wide(kind), BottleneckConfig(bottleneck_size=8))
    attn, ffn = SITES[kind]
    found = sites(model)
    assert any(p.endswith("." + attn) for p in found) and any(p.endswith("." + ffn) for p in found)
    if kind in ("bert", "roberta"):  # the FFN site is the block's output, not the attention's
        assert sum(p.endswith(".attention.output") for p in found) == 2
        assert sum(not p.endswith(".attention.output") for p in found) == 2


def test_sequential_formula_on_one_sublayer() -> None:
    model = get_peft_model(
        tiny_wide("llama"),
        BottleneckConfig(bottleneck_size=8, init="normal", scaling=0.5, non_linearity="relu"),
    )
    layer = model.get_base_model().get_submodule("model.layers.0.mlp")
    block = layer.bottleneck["default"]
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        h = layer.base_layer(x)
        expected = h + 0.5 * block.up(torch.relu(block.down(h)))
        torch.testing.assert_close(layer(x), expected)


def test_pfeiffer_formula_on_llama_reads_the_residual_stream() -> None:
    """Pre-LN: the adapter reads h + r (r: the input of post_attention_layernorm), adds to h."""
    model = get_peft_model(
        tiny_wide("llama"), BottleneckConfig(bottleneck_size=8, init="normal", placement="pfeiffer")
    )
    layer = model.get_base_model().get_submodule("model.layers.0.mlp")
    norm = model.get_base_model().get_submodule("model.layers.0.post_attention_layernorm")
    block = layer.bottleneck["default"]
    r = torch.randn(2, 3, 64)
    with torch.no_grad():
        h = layer.base_layer(norm(r))
        expected = h + block.up(torch.relu(block.down(h + r)))
        torch.testing.assert_close(layer(norm(r)), expected)


def test_pfeiffer_formula_on_bert() -> None:
    """Post-LN, as AdapterHub's SeqBnConfig: LN(h + f(LN(h + r)) + r), h after the dense layer."""
    model = get_peft_model(
        tiny_wide("bert"), BottleneckConfig(bottleneck_size=8, init="normal", placement="pfeiffer")
    )
    layer = model.get_base_model().get_submodule("encoder.layer.1.output")
    base, block = layer.base_layer, layer.bottleneck["default"]
    x, r = torch.randn(2, 3, 128), torch.randn(2, 3, 64)
    with torch.no_grad():
        h = base.dense(x)
        expected = base.LayerNorm(h + block.up(torch.relu(block.down(base.LayerNorm(h + r)))) + r)
        torch.testing.assert_close(layer(x, r), expected)


def test_parallel_formula_on_llama_ffn() -> None:
    """The parallel adapter reads the residual stream r (the FFN's LayerNorm input), as AdapterHub."""
    model = get_peft_model(
        tiny_wide("llama"), BottleneckConfig(bottleneck_size=8, init="normal", placement="parallel")
    )
    layer = model.get_base_model().get_submodule("model.layers.1.mlp")
    norm = model.get_base_model().get_submodule("model.layers.1.post_attention_layernorm")
    block = layer.bottleneck["default"]
    assert block.scaling == 4.0  # He et al.'s scaling for parallel adapters
    r = torch.randn(2, 3, 64)
    with torch.no_grad():
        expected = layer.base_layer(norm(r)) + 4.0 * block.up(torch.relu(block.down(r)))
        torch.testing.assert_close(layer(norm(r)), expected)


def test_houlsby_parameter_count_d768_m64_12_layers() -> None:
    with torch.device("meta"):
        base = BertModel(
            BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
        )
    model = get_peft_model(base, BottleneckConfig(bottleneck_size=64, placement="houlsby", ln_before=True))
    d, m, layers = 768, 64, 12
    assert model.get_nb_trainable_parameters()[0] == (2 * d * m + m + d + 2 * d) * 2 * layers == 2_416_128
    pfeiffer = get_peft_model(
        BertModel(
            BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
        ),
        BottleneckConfig(bottleneck_size=8, placement="pfeiffer"),
    )
    assert pfeiffer.get_nb_trainable_parameters()[0] == (2 * 64 * 8 + 8 + 64) * 2


def test_reduction_factor() -> None:
    model = get_peft_model(tiny_wide("llama"), BottleneckConfig(reduction_factor=16))
    assert (
        model.get_base_model().get_submodule("model.layers.0.mlp").bottleneck["default"].down.out_features
        == 4
    )
    # Each preset's default, as AdapterHub's: 16 for houlsby and pfeiffer, 2 for parallel.
    parallel = get_peft_model(tiny_wide("llama"), BottleneckConfig(placement="par_bn"))
    assert (
        parallel.get_base_model().get_submodule("model.layers.0.mlp").bottleneck["default"].down.out_features
        == 32
    )


@pytest.mark.parametrize(
    ("placement", "expected"),
    [
        ("houlsby", dict(placement="houlsby", non_linearity="swish", original_ln_before=False, scaling=1.0)),
        ("double_seq_bn", dict(placement="houlsby", non_linearity="swish", original_ln_before=False)),
        ("pfeiffer", dict(placement="pfeiffer", non_linearity="relu", original_ln_before=True, scaling=1.0)),
        ("seq_bn", dict(placement="pfeiffer", original_ln_before=True)),
        ("parallel", dict(placement="parallel", non_linearity="relu", original_ln_before=False, scaling=4.0)),
        ("par_bn", dict(placement="parallel", scaling=4.0)),
    ],
)
def test_presets_fill_the_unset_fields(placement: str, expected: dict) -> None:
    cfg = BottleneckConfig(placement=placement)
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert (cfg.ln_before, cfg.ln_after, cfg.original_ln_after, cfg.residual_before_ln) == (
        False,
        False,
        True,
        True,
    )
    explicit = BottleneckConfig(
        placement=placement, non_linearity="gelu", original_ln_before=False, scaling=2.0
    )
    assert (explicit.non_linearity, explicit.original_ln_before, explicit.scaling) == ("gelu", False, 2.0)


def test_layer_norm_is_the_older_name_of_ln_before(tmp_path) -> None:
    cfg = BottleneckConfig(bottleneck_size=8, layer_norm=True)
    assert cfg.ln_before and cfg.layer_norm is None
    model = get_peft_model(tiny_wide("llama"), cfg)
    block = model.get_base_model().get_submodule("model.layers.0.mlp").bottleneck["default"]
    assert isinstance(block.layer_norm, nn.LayerNorm)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["ln_before"] is True


def test_learned_and_channel_scaling_and_leave_out() -> None:
    model = get_peft_model(
        tiny_wide("llama"), BottleneckConfig(bottleneck_size=8, scaling="channel", leave_out=[0])
    )
    assert sites(model) == ["model.layers.1.self_attn", "model.layers.1.mlp"]
    block = model.get_base_model().get_submodule("model.layers.1.mlp").bottleneck["default"]
    assert block.scale.shape == (64,) and block.scale.requires_grad
    learned = get_peft_model(tiny_wide("llama"), BottleneckConfig(bottleneck_size=8, scaling="learned"))
    assert learned.get_base_model().get_submodule("model.layers.0.mlp").bottleneck["default"].scale.shape == (
        1,
    )


def test_original_ln_after_false_is_refused_on_pre_ln_models() -> None:
    with pytest.raises(ValueError, match="original_ln_after=False.*adds the residual itself"):
        get_peft_model(tiny_wide("llama"), BottleneckConfig(bottleneck_size=8, original_ln_after=False))


def test_merge_is_a_clear_error() -> None:
    model = get_peft_model(tiny_wide("llama"), BottleneckConfig(bottleneck_size=8))
    with pytest.raises(ValueError, match="cannot be merged.*sequential non-linear.*unload\\(\\)"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    assert len(sites(model)) == 4  # still intact


def test_mixed_batch_of_different_presets_on_bert() -> None:
    """Each row goes through its own adapter's whole placement, original_ln_after=False included."""
    model = get_peft_model(
        tiny_wide("bert"), BottleneckConfig(bottleneck_size=8, init="normal", placement="pfeiffer")
    )
    model.add_adapter("h", BottleneckConfig(bottleneck_size=4, init="normal", placement="houlsby"))
    model.add_adapter(
        "raw", BottleneckConfig(bottleneck_size=4, init="normal", placement="seq_bn", original_ln_after=False)
    )
    x = ids(batch=4)
    assert_rows_match_alone(model, x, ["raw", "default", "__base__", "h"], run)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mixer = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
        self.ff = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(x)
        return x + self.ff(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_user_named_sublayers_on_plain_torch_model(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    ref = Net()(x)
    torch.manual_seed(0)
    cfg = BottleneckConfig(bottleneck_size=4, attention_modules=["mixer"], ffn_modules=["ff"], init="normal")
    model = get_peft_model(Net(), cfg)
    assert sites(model) == ["blocks.0.mixer", "blocks.0.ff", "blocks.1.mixer", "blocks.1.ff"]
    out = model(x)
    assert out.shape == ref.shape and not torch.allclose(out, ref)
    assert model.get_nb_trainable_parameters()[0] == (2 * 16 * 4 + 4 + 16) * 4


def test_unknown_architecture_says_which_names_to_pass() -> None:
    with pytest.raises(ValueError, match=r"attention_modules=.*ffn_modules=.*e.g. among \['ff', 'mixer'\]"):
        get_peft_model(Net(), BottleneckConfig(bottleneck_size=4))


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="placement='sideways'"):
        BottleneckConfig(placement="sideways")
    with pytest.raises(ValueError, match="not both"):
        BottleneckConfig(bottleneck_size=8, reduction_factor=16)
    with pytest.raises(ValueError, match="non_linearity='tanhh'"):
        BottleneckConfig(non_linearity="tanhh")
    with pytest.raises(ValueError, match="residual_before_ln='pre_add'"):
        BottleneckConfig(residual_before_ln="pre_add")
    with pytest.raises(ValueError, match="scaling='fixed'"):
        BottleneckConfig(scaling="fixed")
    with pytest.raises(ValueError, match="dropout=1.5"):
        BottleneckConfig(dropout=1.5)
    with pytest.raises(ValueError, match="dropout='0.1'"):
        BottleneckConfig(dropout="0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ln_after='yes' must be True or False"):
        BottleneckConfig(ln_after="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ffn_modules=\\['nope'\\] matched no module"):
        get_peft_model(Net(), BottleneckConfig(attention_modules=["mixer"], ffn_modules=["nope"]))


def test_layers_to_transform() -> None:
    model = get_peft_model(tiny_wide("llama"), BottleneckConfig(bottleneck_size=8, layers_to_transform=[1]))
    assert sites(model) == ["model.layers.1.self_attn", "model.layers.1.mlp"]


def test_unload_removes_the_residual_hook_also_after_a_deep_copy() -> None:
    import copy

    model = get_peft_model(
        tiny_wide("llama"), BottleneckConfig(bottleneck_size=8, init="normal", placement="pfeiffer")
    )
    twin = copy.deepcopy(model)
    x = ids()
    before = run(model, x)
    torch.testing.assert_close(run(twin, x), before, rtol=0, atol=0)
    plain = twin.unload()
    assert not any(m._forward_pre_hooks for m in plain.modules())
    torch.testing.assert_close(run(plain, x), run(tiny_wide("llama"), x), rtol=0, atol=0)
    torch.testing.assert_close(run(model, x), before, rtol=0, atol=0)  # the original still has its hooks


@pytest.mark.parametrize(
    ("kind", "placement"), [("bert", "pfeiffer"), ("bert", "houlsby"), ("llama", "pfeiffer")]
)
def test_a_file_from_an_older_deltatune_keeps_its_meaning(kind: str, placement: str, tmp_path) -> None:
    """Saved before the AdapterHub switches: no original_ln_before, layer_norm=True, BERT keys on
    ``output.dense``. The adapter read h: h + f(LN_adapter(h))."""
    from safetensors.torch import load_file, save_file

    model = get_peft_model(
        tiny_wide(kind),
        BottleneckConfig(
            bottleneck_size=8, init="normal", placement=placement, original_ln_before=False, ln_before=True
        ),
    )
    model.eval()
    out = run(model, ids())
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    old = {k: v for k, v in cfg.items() if k in ("peft_type", "task_type", "bottleneck_size", "placement")}
    old.update(layer_norm=True, non_linearity=cfg["non_linearity"], scaling=1.0, reduction_factor=None)
    (tmp_path / "adapter_config.json").write_text(json.dumps(old))
    state = load_file(tmp_path / "adapter_model.safetensors")
    if kind == "bert":
        state = {k.replace(".output.bottleneck.", ".output.dense.bottleneck."): v for k, v in state.items()}
    save_file(state, tmp_path / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(tiny_wide(kind), tmp_path)
    assert loaded.peft_config["default"].original_ln_before is False
    torch.testing.assert_close(run(loaded, ids()), out, rtol=0, atol=1e-6)
