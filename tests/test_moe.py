"""LoRA on mixture-of-experts models: fused expert parameters (``target_parameters``), the router,
and ``all-linear`` on MoE models, with Hugging Face PEFT as the oracle."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.methods import lora_experts
from deltatune.methods.lora_param import ParamLora

peft = pytest.importorskip("peft")

COMMON = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# Every MoE family transformers builds from a config (no download); 4 experts, top-2.
MOE: dict[str, dict[str, object]] = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 32,
    },
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "deepseek_v3": {
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "q_lora_rank": 16,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 4,
        "qk_nope_head_dim": 4,
        "v_head_dim": 8,
        "n_shared_experts": 1,
    },
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 8},
}
# The other families, with settings every config class takes (extra keys are ignored).
_ANY = {
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 16,
    "head_dim": 8,
}
for _family in ("minimax", "glm4_moe", "ernie4_5_moe", "hunyuan_v1_moe", "flex_olmo", "granitemoe", "jetmoe"):
    MOE[_family] = _ANY
for _family in ("exaone_moe", "afmoe", "solar_open", "cohere2_moe", "phimoe", "llama4_text"):
    MOE[_family] = _ANY
MOE["deepseek_v2"] = {**MOE["deepseek_v3"], "first_k_dense_replace": 1}
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# Where a family names its expert stacks otherwise.
EXPERT_NAMES = {"jetmoe": ["experts.input_linear.weight", "experts.output_linear.weight"]}
EXPERT_NAMES["granitemoe"] = ["block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.experts.down_proj"]
EXPERT_NAMES["llama4_text"] = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]


def tiny_moe(model_type: str, seed: int = 0) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **COMMON, **MOE[model_type])
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # some families initialise their routers to zero: make routing non-trivial
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) or p.dim() == 3:
                p.normal_(0, 0.2)
    return model.eval()


def inputs(batch: int = 3, seq: int = 7) -> torch.Tensor:
    return torch.randint(3, 96, (batch, seq), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, ids: torch.Tensor, **kw: object) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits  # type: ignore[no-any-return]


def randomize(model: nn.Module, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def peft_names(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters by name (the same names in PEFT and deltatune)."""
    return dict(model.named_parameters())


def copy_from_peft(ours: nn.Module, theirs: nn.Module) -> None:
    src = peft_names(theirs)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            p.copy_(src[n])


def both(model_type: str, **config: object) -> tuple[nn.Module, nn.Module]:
    """(PEFT model, deltatune model) over copies of one tiny base, same config."""
    base = tiny_moe(model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = {"r": 4, "lora_alpha": 8, **config}
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config)).eval()  # type: ignore[arg-type]
    ours = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(**config)).eval()  # type: ignore[arg-type]
    return theirs, ours


CONFIGS: dict[str, dict[str, object]] = {
    "all-linear": {"target_modules": "all-linear"},
    "experts": {"target_modules": [], "target_parameters": EXPERTS},
    "experts+attention": {"target_modules": ["q_proj", "v_proj"], "target_parameters": ["down_proj"]},
}


@pytest.mark.parametrize("case", list(CONFIGS))
@pytest.mark.parametrize("model_type", list(MOE))
def test_matches_peft_both_ways(model_type: str, case: str, tmp_path: Path) -> None:
    if case == "experts+attention" and (model_type.startswith("deepseek") or model_type == "jetmoe"):
        pytest.skip("this attention has no q_proj / v_proj")
    if case == "all-linear" and model_type in ("phimoe", "llama4_text"):
        pytest.skip("the router is an nn.Linear subclass returning a tuple: LoRA on it fails in PEFT too")
    config = dict(CONFIGS[case])
    if model_type in EXPERT_NAMES and case != "all-linear":
        config["target_parameters"] = EXPERT_NAMES[model_type][: len(config["target_parameters"])]  # type: ignore[arg-type]
    theirs, ours = both(model_type, **config)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    # deltatune's file in PEFT ...
    randomize(ours)
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read = peft.PeftModel.from_pretrained(tiny_moe(model_type), tmp_path / "ours")
    ids = inputs()
    expected = logits(ours, ids)
    assert (expected - logits(tiny_moe(model_type), ids)).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(logits(read, ids), expected, atol=1e-5, rtol=0)
    # ... and PEFT's file here.
    randomize(theirs, seed=5)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = dt.PeftModel.from_pretrained(tiny_moe(model_type), tmp_path / "theirs")
    torch.testing.assert_close(logits(loaded, ids), logits(theirs, ids), atol=1e-5, rtol=0)
    # The written config is PEFT's (targets, fused-parameter rank and alpha patterns).
    a = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    b = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for key in ("target_parameters", "rank_pattern", "alpha_pattern"):
        assert sorted(a[key] or []) == sorted(b[key] or []), key


def test_all_linear_on_mixtral_adapts_attention_router_and_experts() -> None:
    theirs, ours = both("mixtral", target_modules="all-linear")
    config = ours.peft_config["default"]
    assert config.target_parameters == ["down_proj", "gate.weight", "gate_up_proj"]
    assert config.target_modules == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert config.rank_pattern == {r".*\.gate_up_proj": 8}  # gate and up side by side: 2r, 2 alpha
    mlp = ours.get_base_model().model.layers[0].mlp
    assert isinstance(mlp.gate, ParamLora) and mlp.gate.parameter_name == "weight"
    outer, inner = mlp.experts.chain()
    assert (outer.parameter_name, inner.parameter_name) == ("down_proj", "gate_up_proj")
    keys = set(ours.get_adapter_state_dict())
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in keys
    # gate_up_proj (4 experts, out 2·48, in 32) at rank 8: A (4·8, 32), B (96, 4·8)
    assert tuple(inner.lora_A["default"].weight.shape) == (32, 32)
    assert tuple(inner.lora_B["default"].weight.shape) == (96, 32)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_per_expert_factors_are_the_files_layout() -> None:
    """W'[e] = W[e] + s·B[e] A[e] with A[e] = rows e·r..(e+1)·r of lora_A and B[e] = columns e, e+E, ...
    of lora_B: checked against the merged weight, expert by expert."""
    _, ours = both("mixtral", target_modules=[], target_parameters=["gate_up_proj"])
    randomize(ours)
    layer = ours.get_base_model().model.layers[1].mlp.experts
    w = layer.parameter().detach().clone()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    e_count, r, s = 4, 4, 2.0
    ours.merge_adapter()
    for e in range(e_count):
        a_e, b_e = a[e * r : (e + 1) * r], b[:, e::e_count]
        torch.testing.assert_close(layer.parameter()[e], w[e] + s * b_e @ a_e, atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "qwen2_moe"])
def test_merge_unmerge_exact(model_type: str) -> None:
    _, ours = both(model_type, target_modules="all-linear", target_parameters=EXPERTS)
    randomize(ours)
    ids = inputs()
    before = {k: v.clone() for k, v in ours.get_base_model().state_dict().items() if "lora_" not in k}
    unmerged = logits(ours, ids)
    ours.merge_adapter()
    torch.testing.assert_close(logits(ours, ids), unmerged, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    after = {k: v for k, v in ours.get_base_model().state_dict().items() if "lora_" not in k}
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, atol=1e-6, rtol=0)
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, ParamLora) for m in merged.modules())
    assert not any("lora_" in n or "base_layer" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, ids), unmerged, atol=1e-5, rtol=0)


def test_unload_gives_the_plain_model_back() -> None:
    _, ours = both("olmoe", target_modules="all-linear")
    randomize(ours)
    ids = inputs()
    base = ours.unload()
    assert [n for n, _ in base.named_parameters()] == [n for n, _ in tiny_moe("olmoe").named_parameters()]
    torch.testing.assert_close(logits(base, ids), logits(tiny_moe("olmoe"), ids), atol=0, rtol=0)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_training_step_gradients_match_peft_and_touch_only_adapters(model_type: str) -> None:
    theirs, ours = both(model_type, target_modules="all-linear", target_parameters=EXPERTS)
    randomize(theirs)
    copy_from_peft(ours, theirs)
    ids = inputs()
    for m in (theirs, ours):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in peft_names(theirs).items() if p.requires_grad}
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(mine) == set(grads) and mine
    for n, g in grads.items():
        torch.testing.assert_close(mine[n], g, atol=1e-5, rtol=1e-4, msg=n)
    snapshot = {n: p.detach().clone() for n, p in ours.named_parameters()}
    torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1).step()
    changed = {n for n, p in ours.named_parameters() if not torch.equal(p, snapshot[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any(".experts.base_layer.lora_A." in n for n in changed)


def test_fast_path_is_taken_and_equals_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """The grouped per-token path and W' = W + s·B A through the model's own experts agree."""
    _, ours = both("qwen3_moe", target_modules=[], target_parameters=EXPERTS)
    randomize(ours)
    ids = inputs()
    calls: list[int] = []
    real_forward = lora_experts.forward

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real_forward(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(lora_experts, "forward", counting)
    fast = logits(ours, ids)
    assert len(calls) == 2  # one per MoE layer
    monkeypatch.setattr(lora_experts, "call_args", lambda *a: None)
    torch.testing.assert_close(fast, logits(ours, ids), atol=1e-5, rtol=0)


def test_mixed_batch_rows_equal_each_adapter_alone() -> None:
    _, ours = both("mixtral", target_modules="all-linear")
    ours.add_adapter("other", dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize(ours)
    ids = inputs(batch=3)
    names = ["default", "other", "__base__"]
    mixed = logits(ours, ids, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            with ours.disable_adapter():
                alone = logits(ours, ids[row : row + 1])
        else:
            ours.set_adapter(name)
            alone = logits(ours, ids[row : row + 1])
        torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=0)


def test_disable_gives_the_base_model() -> None:
    _, ours = both("gpt_oss", target_modules=[], target_parameters=EXPERTS)
    randomize(ours)
    ids = inputs()
    with ours.disable_adapter():
        torch.testing.assert_close(logits(ours, ids), logits(tiny_moe("gpt_oss"), ids), atol=0, rtol=0)
    assert (logits(ours, ids) - logits(tiny_moe("gpt_oss"), ids)).abs().max() > 1e-3


def test_second_adapter_reuses_the_wrappers_and_switches() -> None:
    theirs, ours = both("mixtral", target_modules=[], target_parameters=EXPERTS)
    cfg = {"r": 2, "lora_alpha": 4, "target_modules": [], "target_parameters": EXPERTS}
    theirs.add_adapter("two", peft.LoraConfig(**cfg))
    ours.add_adapter("two", dt.LoraConfig(**cfg))
    assert len(ours.get_base_model().model.layers[0].mlp.experts.chain()) == 2  # no third wrapper
    randomize(theirs)
    copy_from_peft(ours, theirs)
    ids = inputs()
    for name in ("default", "two"):
        theirs.set_adapter(name)
        ours.set_adapter(name)
        torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="same parameters"):
        ours.add_adapter("three", dt.LoraConfig(target_modules=[], target_parameters=["gate_up_proj"]))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lora_dropout": 0.1}, "lora_dropout"),
        ({"use_dora": True}, "DoRA"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"target_parameters": ["nonexistent_proj"]}, "matched no parameter"),
    ],
)
def test_clear_refusals_leave_the_model_untouched(settings: dict[str, object], message: str) -> None:
    model = tiny_moe("mixtral")
    names = [n for n, _ in model.named_parameters()]
    config = {"target_modules": ["q_proj"], "target_parameters": EXPERTS, **settings}
    with pytest.raises(ValueError, match=message):
        dt.get_peft_model(model, dt.LoraConfig(**config))  # type: ignore[arg-type]
    assert [n for n, _ in model.named_parameters()] == names


def test_bad_target_parameters_type_and_weighted_combination_refused() -> None:
    with pytest.raises(ValueError, match="target_parameters"):
        dt.LoraConfig(target_parameters="gate_up_proj")  # type: ignore[arg-type]
    _, ours = both("mixtral", target_modules=[], target_parameters=EXPERTS)
    with pytest.raises(ValueError, match="add_weighted_adapter"):
        ours.add_weighted_adapter(["default"], [1.0], "mix")


def test_partial_fused_names_refused() -> None:
    with pytest.raises(ValueError, match="fused"):
        dt.get_peft_model(tiny_moe("mixtral"), dt.LoraConfig(target_modules=["q_proj", "w1"]))


def test_default_targets_on_mixtral_keep_the_table() -> None:
    """PEFT raises with no targets on Mixtral (its MoE renaming empties the list); deltatune uses
    the per-architecture default q_proj, v_proj."""
    ours = dt.get_peft_model(tiny_moe("mixtral"), dt.LoraConfig(r=4))
    assert ours.peft_config["default"].target_modules == ["q_proj", "v_proj"]
    assert not any(isinstance(m, ParamLora) for m in ours.modules())


def _gemma3() -> nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(**{**COMMON, "head_dim": 8})
    return Gemma3ForCausalLM(cfg).eval()


def test_gemma3_default_targets_are_peft_s() -> None:
    theirs = peft.get_peft_model(_gemma3(), peft.LoraConfig(r=4))
    ours = dt.get_peft_model(_gemma3(), dt.LoraConfig(r=4))
    assert ours.peft_config["default"].target_modules == ["q_proj", "v_proj"]
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_default_table_is_peft_s_in_full() -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as theirs

    from deltatune.targeting import LORA_DEFAULT_TARGETS

    for model_type, targets in theirs.items():
        assert LORA_DEFAULT_TARGETS.get(model_type) == targets, model_type
    # and (IA)³'s two tables
    from peft.utils import constants

    from deltatune.methods.ia3 import IA3_DEFAULT_FEEDFORWARD, IA3_DEFAULT_TARGETS

    assert IA3_DEFAULT_TARGETS == constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
    assert IA3_DEFAULT_FEEDFORWARD == constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING


def _meta_mixtral(build: Callable[[nn.Module], nn.Module]) -> str:
    from transformers import AutoModelForCausalLM, MixtralConfig

    # Mixtral-8x7B's configuration, on the meta device (no memory for weights).
    cfg = MixtralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
        wrapped = build(model)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        wrapped.print_trainable_parameters()  # type: ignore[operator]
    return out.getvalue()


def test_mixtral_8x7b_on_meta_reports_peft_s_line() -> None:
    kw = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _meta_mixtral(lambda m: peft.get_peft_model(m, peft.LoraConfig(**kw)))
    ours = _meta_mixtral(lambda m: dt.get_peft_model(m, dt.LoraConfig(**kw)))  # type: ignore[arg-type]
    assert ours == theirs
    assert ours == "trainable params: 359,665,664 || all params: 47,062,458,368 || trainable%: 0.7642\n"


def test_qlora_base_experts_stay_dense_and_their_lora_merges() -> None:
    """quantize_model puts the attention in 4 bits; the fused experts stay dense (as with
    bitsandbytes), so their LoRA runs and merges exactly over the 4-bit model."""
    from deltatune.quant import quantize_model

    model = quantize_model(tiny_moe("mixtral"))
    ours = dt.get_peft_model(model, dt.LoraConfig(r=4, target_modules=[], target_parameters=EXPERTS))
    randomize(ours)
    ids = inputs()
    unmerged = logits(ours, ids)
    with ours.disable_adapter():
        assert (logits(ours, ids) - unmerged).abs().max() > 1e-3
    ours.merge_adapter()
    torch.testing.assert_close(logits(ours, ids), unmerged, atol=1e-5, rtol=0)


def test_non_float_expert_weights_refused() -> None:
    model = tiny_moe("mixtral")
    for layer in model.model.layers:
        layer.mlp.experts.down_proj = nn.Parameter(
            layer.mlp.experts.down_proj.data.to(torch.int8), requires_grad=False
        )
    with pytest.raises(ValueError, match="floating point"):
        dt.get_peft_model(model, dt.LoraConfig(target_modules=[], target_parameters=["down_proj"]))


def test_cli_trains_expert_lora_that_peft_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from deltatune.cli import main
    from train_utils import VOCAB, tokenizer, toy_sft_records

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("mixtral", **{**COMMON, "vocab_size": VOCAB}, **MOE["mixtral"])
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "lm")
    tokenizer().save_pretrained(tmp_path / "lm")
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_sft_records(8)))
    args = [
        "train", "--task", "causal_lm", "--model", str(tmp_path / "lm"), "--train-file", str(tmp_path / "sft.jsonl"),
        "--output-dir", str(tmp_path / "run"), "--max-steps", "2", "--quiet", "--lr", "0.01",
        "--target-parameters", "mlp.experts.gate_up_proj,mlp.experts.down_proj",
    ]  # fmt: skip
    assert main(args) == 0
    adapter = tmp_path / "run" / "adapter"
    capsys.readouterr()
    assert main(["inspect", str(adapter)]) == 0
    assert f"target_parameters: {EXPERTS}" in capsys.readouterr().out
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["target_parameters"] == EXPERTS and saved["lora_dropout"] == 0.0
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    ours = dt.PeftModel.from_pretrained(copy.deepcopy(base), adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base, adapter)
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=1e-5, rtol=0)
    assert any(
        (p != 0).any() for n, p in ours.get_adapter_state_dict().items() if "experts" in n and "lora_B" in n
    )  # the step trained the experts' factors


V4_LAYERS = {
    "mixtral": ("block_sparse_moe", {"w1": (48, 32), "w3": (48, 32), "w2": (32, 48)}),
    "qwen3_moe": ("mlp", {"gate_proj": (16, 32), "up_proj": (16, 32), "down_proj": (32, 16)}),
}


@pytest.mark.parametrize("model_type", list(V4_LAYERS))
def test_transformers4_expert_adapter_loads_as_peft_converts_it(model_type: str, tmp_path: Path) -> None:
    """An adapter trained when every expert was a Linear layer (keys ``experts.<e>.w1.lora_A``): PEFT
    converts it to the fused layout on loading; deltatune gives the same model."""
    from safetensors.torch import save_file

    block, layers = V4_LAYERS[model_type]
    gen = torch.Generator().manual_seed(0)
    state = {}
    for i in range(2):
        for e in range(4):
            for leaf, (out_f, in_f) in layers.items():
                prefix = f"base_model.model.model.layers.{i}.{block}.experts.{e}.{leaf}"
                state[f"{prefix}.lora_A.weight"] = torch.randn(4, in_f, generator=gen) * 0.3
                state[f"{prefix}.lora_B.weight"] = torch.randn(out_f, 4, generator=gen) * 0.3
        prefix = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        state[f"{prefix}.lora_A.weight"] = torch.randn(4, 32, generator=gen) * 0.3
        state[f"{prefix}.lora_B.weight"] = torch.randn(32, 4, generator=gen) * 0.3
    tmp_path.mkdir(exist_ok=True)
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", *layers]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_moe(model_type), tmp_path)
        ours = dt.PeftModel.from_pretrained(tiny_moe(model_type), tmp_path)
    ids = inputs()
    assert ours.peft_config["default"].target_parameters == ["down_proj", "gate_up_proj"]
    assert (logits(ours, ids) - logits(tiny_moe(model_type), ids)).abs().max() > 1e-3
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=1e-5, rtol=0)


VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    "rslora": ("mixtral", {"use_rslora": True, "lora_alpha": 16}),
    "patterns": ("qwen3_moe", {"rank_pattern": {"down_proj": 2}, "alpha_pattern": {"gate_up_proj": 3}}),
    "gaussian": ("olmoe", {"init_lora_weights": "gaussian"}),
    "bias-all": ("gpt_oss", {"bias": "all"}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variants_match_peft(variant: str, tmp_path: Path) -> None:
    model_type, settings = VARIANTS[variant]
    theirs, ours = both(model_type, target_modules=["q_proj"], target_parameters=EXPERTS, **settings)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    randomize(theirs)
    theirs.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(tiny_moe(model_type), tmp_path)
    ids = inputs()
    torch.testing.assert_close(logits(loaded, ids), logits(theirs, ids), atol=1e-5, rtol=0)
