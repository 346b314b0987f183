"""LoRA on Linear, Conv1D and Embedding: forward, training, merge, adapters, mixed batches."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.methods.lora import Embedding, Linear
from helpers import MODELS, model_output, randomize_lora, tiny_bert, tiny_gpt2, tiny_llama, tiny_mlp, tiny_t5


def wrap(name: str, **kw: object) -> tuple[PeftModel, nn.Module, dict[str, torch.Tensor]]:
    factory, targets, inputs = MODELS[name]
    base = factory()
    reference = factory()  # an untouched copy with the same weights
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kw)  # type: ignore[arg-type]
    return get_peft_model(base, config), reference, inputs()


def run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model_output(model(**inputs))


def test_fresh_adapter_changes_nothing(model_name: str) -> None:
    model, reference, inputs = wrap(model_name)
    torch.testing.assert_close(run(model, inputs), run(reference, inputs), rtol=0, atol=0)


def test_lora_b_zero_a_kaiming_by_default() -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer, Linear)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    a = layer.lora_A["default"].weight
    bound = 1 / math.sqrt(a.shape[1])  # kaiming_uniform(a=sqrt(5)) bound
    assert a.abs().max() <= bound and a.abs().max() > bound / 2


def test_gaussian_init_std() -> None:
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="gaussian")
    )
    a = model.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert 0.15 < a.std().item() < 0.35  # std 1/r = 0.25


def test_forward_equals_formula_on_linear() -> None:
    model = get_peft_model(
        tiny_mlp(), LoraConfig(r=3, lora_alpha=6, target_modules=["lin1"], init_lora_weights=False)
    )
    layer = model.get_base_model().lin1
    x = torch.randn(5, 20)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ layer.base_layer.weight.T + layer.base_layer.bias + 2.0 * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected)


def test_conv1d_forward_and_fan_in_fan_out() -> None:
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False)
    model = get_peft_model(tiny_gpt2(), config)
    layer = model.get_base_model().transformer.h[0].attn.c_attn
    assert config.fan_in_fan_out is True  # GPT-2 stores W transposed; recorded for other readers
    x = torch.randn(2, 3, 32)
    w = layer.base_layer.weight  # (in, out)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ w + layer.base_layer.bias + (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected)
    assert a.shape == (4, 32) and b.shape == (96, 4)


def test_embedding_lora() -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"], init_lora_weights=False)
    model = get_peft_model(tiny_llama(), config)
    layer = model.get_base_model().model.embed_tokens
    assert isinstance(layer, Embedding)
    ids = torch.tensor([[1, 5, 7]])
    a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    expected = layer.base_layer.weight[ids] + 2.0 * (a.T[ids] @ b.T)
    torch.testing.assert_close(layer(ids), expected)
    before = run(model, {"input_ids": ids})
    model.merge_adapter()
    torch.testing.assert_close(run(model, {"input_ids": ids}), before, atol=1e-5, rtol=0)


def test_rslora_scaling() -> None:
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj"])
    )
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4)
    plain = get_peft_model(tiny_llama(), LoraConfig(r=16, lora_alpha=8, target_modules=["q_proj"]))
    assert plain.get_base_model().model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(0.5)


def test_rank_and_alpha_pattern() -> None:
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
        alpha_pattern={"v_proj": 1},
    )
    model = get_peft_model(tiny_llama(), config)
    layers = model.get_base_model().model.layers
    assert layers[0].self_attn.q_proj.r["default"] == 4
    assert layers[1].self_attn.q_proj.r["default"] == 6
    assert layers[0].self_attn.v_proj.lora_A["default"].weight.shape == (2, 32)
    assert layers[0].self_attn.v_proj.scaling["default"] == pytest.approx(0.5)


def test_layers_to_transform_and_exclude() -> None:
    model = get_peft_model(
        tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    )
    wrapped = [n for n, m in model.named_modules() if isinstance(m, Linear)]
    assert wrapped == [
        "base_model.model.model.layers.1.self_attn.q_proj",
        "base_model.model.model.layers.1.self_attn.v_proj",
    ]
    model = get_peft_model(
        tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"])
    )
    assert all(n.endswith("q_proj") for n, m in model.named_modules() if isinstance(m, Linear))


def test_regex_and_all_linear_targets() -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=r".*layers\.0\.mlp\.(up|down)_proj"))
    assert sorted(n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, Linear)) == [
        "down_proj",
        "up_proj",
    ]
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear"))
    names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, Linear)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not isinstance(model.get_base_model().lm_head, Linear)  # never the output head


def test_bias_modes() -> None:
    model = get_peft_model(tiny_mlp(), LoraConfig(target_modules=["lin0"], bias="lora_only"))
    assert {n for n, p in model.named_parameters() if p.requires_grad and "bias" in n} == {
        "base_model.model.lin0.base_layer.bias"
    }
    model = get_peft_model(tiny_mlp(), LoraConfig(target_modules=["lin0"], bias="all"))
    assert sum(1 for n, p in model.named_parameters() if p.requires_grad and "bias" in n) == 3


def test_disable_adapter_unmerges_merged_adapters() -> None:
    model, reference, inputs = wrap("llama", init_lora_weights=False)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(run(model, inputs), run(reference, inputs), atol=1e-5, rtol=0)


def test_named_adapters_set_delete() -> None:
    model, reference, inputs = wrap("llama", init_lora_weights=False)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    first = run(model, inputs)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    model.set_adapter("other")
    assert model.active_adapter == "other"
    second = run(model, inputs)
    assert not torch.allclose(first, second)
    assert all(".other." in n for n, p in model.named_parameters() if p.requires_grad)
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert not any(".other." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(run(model, inputs), first)


def test_mixed_batch_generate() -> None:
    model, _, inputs = wrap("llama", init_lora_weights=False)
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = inputs["input_ids"][:2]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    alone = {}
    for name in ("default", "b"):
        model.set_adapter(name)
        alone[name] = model.generate(input_ids=ids, **kwargs)
    mixed = model.generate(input_ids=ids, adapter_names=["b", "default"], **kwargs)
    assert torch.equal(mixed[0], alone["b"][0]) and torch.equal(mixed[1], alone["default"][1])


def test_mixed_batch_errors() -> None:
    model, _, inputs = wrap("llama")
    with pytest.raises(ValueError, match="one adapter name"):
        model(**inputs, adapter_names=["default"])
    with pytest.raises(ValueError, match="unknown adapters"):
        model(**inputs, adapter_names=["default", "nope", "default"])
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerged"):
        model(**inputs, adapter_names=["default"] * 3)


def test_generate_passes_through() -> None:
    model, reference, inputs = wrap("llama")
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(**inputs, **kwargs), reference.generate(**inputs, **kwargs))


def test_half_precision_base_keeps_fp32_adapters() -> None:
    """A bf16 base keeps fp32 adapters, and computes what fp32 does on the same (bf16-rounded) weights."""
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(tiny_llama().to(torch.bfloat16), config)
    randomize_lora(model)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    reference = get_peft_model(tiny_llama().to(torch.bfloat16).float(), config)
    reference.load_state_dict(model.state_dict())  # the same adapter (the base: bf16 values upcast)
    with torch.no_grad():
        out = model(input_ids=ids).logits
        expected = reference(input_ids=ids).logits
        with reference.disable_adapter():
            plain = reference(input_ids=ids).logits
    assert out.dtype == torch.bfloat16
    assert (expected - plain).abs().max() > 0.2  # the adapter matters more than the tolerance below
    torch.testing.assert_close(out.float(), expected, atol=0.02, rtol=0.02)


def test_safe_merge_refuses_nan() -> None:
    model, _, _ = wrap("mlp", init_lora_weights=False)
    with torch.no_grad():
        model.get_base_model().lin0.lora_B["default"].weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)


def test_autocast_bf16_forward_and_backward() -> None:
    model, reference, inputs = wrap("llama", init_lora_weights=False)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs).logits
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)
    with torch.no_grad():
        exact = model(**inputs).logits
    torch.testing.assert_close(out.float(), exact, atol=0.1, rtol=0.05)


def test_inference_on_many_tokens_equals_the_training_path() -> None:
    """Long inputs under no_grad (where a layer may compute x (W + sum s B A)^T instead of the per-token
    LoRA products) give the grad-enabled outputs, for one or two active adapters, and leave the
    base weights as they were; with dropout in training mode, A still sees the dropped input."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "up_proj"]))
    randomize_lora(model)
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    weights = [m.base_layer.weight.clone() for m in layers]
    long_ids = torch.randint(1, 96, (4, 32), generator=torch.Generator().manual_seed(0))  # 128 tokens
    for active in (["default"], ["default", "b"]):
        for layer in layers:
            layer.set_adapter(active)
        with torch.enable_grad():  # the per-token path, as in training
            expected = model(input_ids=long_ids).logits.detach()
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=long_ids).logits, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(  # short inputs, as in decoding
                model(input_ids=long_ids[:1, :4]).logits, expected[:1, :4], rtol=1e-5, atol=1e-5
            )
    for layer, w in zip(layers, weights, strict=True):
        torch.testing.assert_close(layer.base_layer.weight, w, rtol=0, atol=0)

    dropped = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5))
    randomize_lora(dropped)
    dropped.train()
    outs = []
    for grad in (True, False):  # the same dropout masks (same seed) with and without autograd
        torch.manual_seed(7)
        with torch.set_grad_enabled(grad):
            outs.append(dropped(input_ids=long_ids).logits.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(
            dropped.eval()(input_ids=long_ids).logits, outs[0], atol=1e-3
        )  # dropout acted


# -- parity with PEFT (the oracle) on targeting, init values and heads -------------------------
def _lora_paths(model: nn.Module) -> set[str]:
    """Paths (in the base model) of the modules that hold LoRA factors, for ours and PEFT's wrapper."""
    prefix = "base_model.model."
    return {
        name[len(prefix) :]
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and hasattr(module, "base_layer")
    }


def _both(factory: object, **kw: object) -> tuple[PeftModel, nn.Module]:
    peft = pytest.importorskip("peft")
    ours = get_peft_model(factory(), LoraConfig(**kw))  # type: ignore[operator, arg-type]
    theirs = peft.get_peft_model(factory(), peft.LoraConfig(**kw))  # type: ignore[operator]
    return ours, theirs


ALL_LINEAR_CASES = {
    "llama": (tiny_llama, None),
    "llama-seq-cls": (lambda: tiny_llama("seq_cls"), "SEQ_CLS"),
    "gpt2": (tiny_gpt2, None),
    "bert-seq-cls": (tiny_bert, "SEQ_CLS"),
    "bert-no-task": (tiny_bert, None),
    "bert-feature": (lambda: tiny_bert("feature"), "FEATURE_EXTRACTION"),
    "t5": (tiny_t5, None),
    "mlp": (tiny_mlp, None),
}


@pytest.mark.parametrize("case", sorted(ALL_LINEAR_CASES))
def test_all_linear_targets_equal_peft(case: str) -> None:
    """BERT's attention.output.dense / output.dense / pooler.dense are targets; only the output
    embeddings (or, for SEQ_CLS, the score/classifier head) are left out; a plain MLP keeps all."""
    factory, task = ALL_LINEAR_CASES[case]
    ours, theirs = _both(factory, r=4, target_modules="all-linear", task_type=task)
    assert _lora_paths(ours) == _lora_paths(theirs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    if case.startswith("bert"):
        prefix = "" if case == "bert-feature" else "bert."
        assert {f"{prefix}encoder.layer.0.output.dense", f"{prefix}pooler.dense"} <= _lora_paths(ours)


def test_fallback_targets_skip_heads() -> None:
    """With no targets on an architecture without defaults: every block linear, no head."""
    model = get_peft_model(tiny_mlp(), LoraConfig(r=2))
    assert _lora_paths(model) == {"lin0", "lin1"}


@pytest.mark.parametrize(
    "case",
    [
        {"target_modules": ["q_proj", "lm_head"], "modules_to_save": ["lm_head"]},
        {"target_modules": "all-linear", "modules_to_save": ["lm_head", "down_proj"]},
        {"task_type": "SEQ_CLS", "target_modules": ["query", "classifier"]},
    ],
    ids=["target-and-saved", "all-linear-and-saved", "task-head-targeted"],
)
def test_modules_to_save_win_over_targets(case: dict[str, object], tmp_path: object) -> None:
    """A module both targeted and in modules_to_save (or an auto-saved task head) gets no LoRA, only
    the trainable copy: counts, saved keys and loads both ways equal PEFT's."""
    from pathlib import Path

    from safetensors.torch import load_file

    peft = pytest.importorskip("peft")
    factory = tiny_bert if case.get("task_type") else tiny_llama
    ours, theirs = _both(factory, r=4, **case)
    assert _lora_paths(ours) == _lora_paths(theirs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    randomize_lora(theirs)
    with torch.no_grad():  # a trained head copy
        for name, p in theirs.named_parameters():
            if ".modules_to_save." in name:
                p.add_(0.1)
    d = Path(str(tmp_path))
    theirs.save_pretrained(str(d / "theirs"))
    inputs = {"input_ids": torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(1))}
    loaded = PeftModel.from_pretrained(factory(), d / "theirs")
    expected = run(theirs, inputs)
    torch.testing.assert_close(run(loaded, inputs), expected, atol=1e-5, rtol=0)
    loaded.save_pretrained(d / "ours")
    assert set(load_file(d / "ours" / "adapter_model.safetensors")) == set(
        load_file(d / "theirs" / "adapter_model.safetensors")
    )
    back = peft.PeftModel.from_pretrained(factory(), str(d / "ours"))
    torch.testing.assert_close(run(back, inputs), expected, atol=1e-5, rtol=0)


def test_exact_path_target_ignores_layers_to_transform(tmp_path: object) -> None:
    """A target named by its full path is taken whatever layers_to_transform says (PEFT's rule)."""
    from pathlib import Path

    peft = pytest.importorskip("peft")
    kw = {"r": 4, "target_modules": ["q_proj", "lm_head"], "layers_to_transform": [1]}
    ours, theirs = _both(tiny_llama, **kw)
    assert _lora_paths(ours) == _lora_paths(theirs) == {"lm_head", "model.layers.1.self_attn.q_proj"}
    randomize_lora(theirs)
    theirs.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(tiny_llama(), Path(str(tmp_path)))
    inputs = {"input_ids": torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(1))}
    torch.testing.assert_close(run(loaded, inputs), run(theirs, inputs), atol=1e-5, rtol=0)
    assert peft is not None


def test_bias_all_with_task_head_equals_peft(tmp_path: object) -> None:
    """bias='all' trains the head copy's bias, not the frozen original's; PEFT's file (which also
    holds ``classifier.modules_to_save.bias``) loads, and ours loads in PEFT."""
    from pathlib import Path

    peft = pytest.importorskip("peft")
    kw = {"task_type": "SEQ_CLS", "r": 4, "target_modules": ["query", "value"], "bias": "all"}
    ours, theirs = _both(tiny_bert, **kw)

    def trainable(model: nn.Module, prefix: str) -> set[str]:
        return {n[len(prefix) :] for n, p in model.named_parameters() if p.requires_grad}

    assert trainable(ours, "base_model.model.") == trainable(theirs, "base_model.model.")
    assert "classifier.original_module.bias" not in trainable(ours, "base_model.model.")
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.05)
    d = Path(str(tmp_path))
    theirs.save_pretrained(str(d / "theirs"))
    inputs = {"input_ids": torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(1))}
    expected = run(theirs, inputs)
    loaded = PeftModel.from_pretrained(tiny_bert(), d / "theirs")
    torch.testing.assert_close(run(loaded, inputs), expected, atol=1e-5, rtol=0)
    loaded.save_pretrained(d / "ours")
    back = peft.PeftModel.from_pretrained(tiny_bert(), str(d / "ours"))
    torch.testing.assert_close(run(back, inputs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_equal_peft_and_files_load_both_ways(init: str, tmp_path: object) -> None:
    """Same factors and residual base weight as PEFT; a file naming the init means 'redo it on the
    original base' in both libraries, so it loads both ways with equal outputs."""
    from pathlib import Path

    peft = pytest.importorskip("peft")
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": init}
    ours, theirs = _both(tiny_llama, **kw)
    q_ours = ours.get_base_model().model.layers[0].self_attn.q_proj
    q_theirs = theirs.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q_ours.lora_A["default"].weight, q_theirs.lora_A["default"].weight)
    torch.testing.assert_close(q_ours.lora_B["default"].weight, q_theirs.lora_B["default"].weight)
    torch.testing.assert_close(q_ours.base_layer.weight, q_theirs.base_layer.weight)
    assert not torch.equal(q_ours.base_layer.weight, tiny_llama().model.layers[0].self_attn.q_proj.weight)
    inputs = {"input_ids": torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(1))}
    torch.testing.assert_close(run(ours, inputs), run(tiny_llama(), inputs), atol=1e-5, rtol=0)
    randomize_lora(ours, std=0.1)
    randomize_lora(theirs, std=0.1)
    d = Path(str(tmp_path))
    ours.save_pretrained(d / "ours")
    theirs.save_pretrained(str(d / "theirs"))
    back = peft.PeftModel.from_pretrained(tiny_llama(), str(d / "ours"))
    torch.testing.assert_close(run(back, inputs), run(ours, inputs), atol=1e-5, rtol=0)
    loaded = PeftModel.from_pretrained(tiny_llama(), d / "theirs")
    torch.testing.assert_close(run(loaded, inputs), run(theirs, inputs), atol=1e-5, rtol=0)


def test_unimplemented_inits_raise_but_factor_only_files_load(tmp_path: object) -> None:
    import json
    from pathlib import Path

    for bad in ["bogus", "orthogonal", "pissa_niter_4", "corda"]:
        with pytest.raises(ValueError, match=f"init_lora_weights='{bad}'.*not implemented in deltatune"):
            LoraConfig(target_modules=["q_proj"], init_lora_weights=bad)
    # A PEFT file whose init only chose the starting factors loads as the LoRA its factors define.
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="orthogonal")
    )
    randomize_lora(theirs)
    d = Path(str(tmp_path))
    theirs.save_pretrained(str(d))
    inputs = {"input_ids": torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(1))}
    loaded = PeftModel.from_pretrained(tiny_llama(), d)
    torch.testing.assert_close(run(loaded, inputs), run(theirs, inputs), atol=1e-5, rtol=0)
    # One whose init also rewrote the base from data cannot be redone: a clear error.
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": "corda"}))
    with pytest.raises(
        ValueError, match="init_lora_weights='corda'.*path_initial_model_for_weight_conversion"
    ):
        PeftModel.from_pretrained(tiny_llama(), d)


def test_layer_replication_is_refused(tmp_path: object) -> None:
    import json
    from pathlib import Path

    with pytest.raises(ValueError, match="layer_replication=.*not implemented in deltatune"):
        LoraConfig(target_modules=["q_proj"], layer_replication=[(0, 2), (1, 2)])
    ours = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    d = Path(str(tmp_path))
    ours.save_pretrained(d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "layer_replication": [[0, 2], [1, 2]]}))
    with pytest.raises(ValueError, match="layer_replication=.*not implemented in deltatune"):
        PeftModel.from_pretrained(tiny_llama(), d)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lora_dropout": "0.1"}, "lora_dropout='0.1' must be a number"),
        ({"lora_alpha": float("nan")}, "lora_alpha=nan must be a finite number"),
        ({"lora_alpha": "16"}, "lora_alpha='16' must be a finite number"),
        ({"lora_dropout": None}, "lora_dropout=None must be a number"),
        ({"target_modules": 5}, "target_modules=5: give a list"),
        ({"target_modules": ["q_proj", 3]}, "target_modules=.*give a list"),
        ({"target_modules": ["q_proj"], "layers_to_transform": "0"}, "layers_to_transform='0'"),
        ({"rank_pattern": ["q_proj"]}, "rank_pattern=.*give a dict"),
        ({"target_modules": "all-linear", "layers_to_transform": [0]}, "cannot be combined"),
        ({"target_modules": r".*\.q_proj", "layers_pattern": "layers"}, "cannot be combined"),
    ],
)
def test_config_values_of_the_wrong_type_are_named(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoraConfig(**settings)  # type: ignore[arg-type]
    if "cannot be combined" in message:  # PEFT refuses the same config, so its files would not load there
        import peft

        with pytest.raises(ValueError):
            peft.LoraConfig(**settings)  # type: ignore[arg-type]
