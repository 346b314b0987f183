"""Adapter files: layout, round trip, atomicity, corrupt / foreign / pickle files, config keys."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltatune import LoraConfig, PeftConfig, PeftModel, get_peft_model
from deltatune.io import WEIGHTS_NAME
from helpers import MODELS, model_output, tiny_llama


def trained(name: str = "llama", **kw: object) -> tuple[PeftModel, dict[str, torch.Tensor]]:
    factory, targets, inputs = MODELS[name]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kw)  # type: ignore[arg-type]
    return get_peft_model(factory(), config), inputs()


def out(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model_output(model(**inputs))


def test_file_layout_matches_the_ecosystem(tmp_path: Path) -> None:
    model, _ = trained("llama", use_rslora=True)
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    assert tensors[f"{key}.lora_A.weight"].shape == (4, 32)
    assert tensors[f"{key}.lora_B.weight"].shape == (32, 4)
    assert len(tensors) == 2 * 4 * 2  # A and B, 4 targets, 2 layers
    assert not any(".default" in k for k in tensors)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["use_rslora"] is True and config["inference_mode"] is True
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "up_proj", "v_proj"]
    assert "LORA adapter" in (tmp_path / "README.md").read_text()


def test_non_default_adapters_go_in_subfolders(tmp_path: Path) -> None:
    model, inputs = trained("llama")
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / WEIGHTS_NAME).is_file() and (tmp_path / WEIGHTS_NAME).is_file()
    model.set_adapter("other")
    expected = out(model, inputs)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    loaded.set_adapter("other")
    torch.testing.assert_close(out(loaded, inputs), expected, atol=0, rtol=0)


def test_default_targets_are_written_out(tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), LoraConfig())
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == [
        "q_proj",
        "v_proj",
    ]


def test_crash_mid_save_leaves_previous_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, inputs = trained("llama")
    model.save_pretrained(tmp_path)
    first = (tmp_path / WEIGHTS_NAME).read_bytes()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("deltatune.config.PeftConfig.save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == first
    assert not [p for p in os.listdir(tmp_path.parent) if p.startswith(".tmp-")]


def test_corrupt_safetensors_is_a_clear_error(tmp_path: Path) -> None:
    model, _ = trained("llama")
    model.save_pretrained(tmp_path)
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_pickle_refused_unless_asked(tmp_path: Path) -> None:
    model, inputs = trained("llama")
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / WEIGHTS_NAME))
    (tmp_path / WEIGHTS_NAME).unlink()
    torch.save(state, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, allow_pickle=True)
    torch.testing.assert_close(out(loaded, inputs), out(model, inputs))
    torch.save(next(iter(state.values())), tmp_path / "adapter_model.bin")  # a bare tensor, not a dict
    with pytest.raises(ValueError, match="holds a Tensor, not an adapter state dict"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, allow_pickle=True)


def test_shape_mismatch_names_module_and_shapes(tmp_path: Path) -> None:
    model, _ = trained("llama")
    model.save_pretrained(tmp_path)
    bigger = tiny_llama(hidden_size=64, head_dim=8)
    with pytest.raises(ValueError, match=r"q_proj.*file has \(4, 32\).*expects \(4, 64\)"):
        PeftModel.from_pretrained(bigger, tmp_path)


def test_failed_load_adapter_leaves_model_unchanged(tmp_path: Path) -> None:
    model, _ = trained("llama")
    model.save_pretrained(tmp_path)
    target = get_peft_model(tiny_llama(hidden_size=64, head_dim=8), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="Shape mismatch"):
        target.load_adapter(tmp_path, adapter_name="x")
    assert list(target.peft_config) == ["default"]
    assert not any(".x." in n for n, _ in target.named_parameters())


def test_unknown_config_keys_warn_and_missing_keys_default(tmp_path: Path) -> None:
    model, inputs = trained("llama")
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config["some_future_option"] = {"enabled": True}
    config["target_parameters"] = None  # inert: dropped quietly
    del config["lora_dropout"], config["rank_pattern"]
    path.write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="some_future_option") as record:
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not any("target_parameters" in str(w.message) for w in record)
    assert loaded.peft_config["default"].lora_dropout == 0.0  # type: ignore[attr-defined]
    torch.testing.assert_close(out(loaded, inputs), out(model, inputs))


def test_unknown_method_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "FANCY_NEW", "r": 2}))
    with pytest.raises(ValueError, match="Unknown PEFT method 'FANCY_NEW'"):
        PeftConfig.from_pretrained(tmp_path)


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no saved adapter"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "nope")


def test_foreign_tensors_rejected(tmp_path: Path) -> None:
    model, _ = trained("llama")
    model.save_pretrained(tmp_path)
    # The config asks for k_proj layers, the weights are q/v/up/down_proj factors.
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["k_proj"]}))
    other = get_peft_model(tiny_llama(), LoraConfig(target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="fit no module"):
        other.load_adapter(tmp_path, adapter_name="foreign")
    assert list(other.peft_config) == ["default"]
    with pytest.raises(ValueError, match="fit no module"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


# -- PEFT's loader keywords ---------------------------------------------------------------
def two_adapters_saved(tmp_path: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Save 'default' in tmp_path and 'other' in tmp_path/other; return inputs and both outputs."""
    model, inputs = trained("llama")
    model.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    default = out(model, inputs)
    model.set_adapter("other")
    other = out(model, inputs)
    assert not torch.allclose(default, other)
    return inputs, default, other


def test_subfolder_loads_the_adapter_in_it(tmp_path: Path) -> None:
    inputs, _, other = two_adapters_saved(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, subfolder="other")
    assert list(loaded.peft_config["default"].target_modules) == ["k_proj"]  # type: ignore[attr-defined]
    torch.testing.assert_close(out(loaded, inputs), other, atol=0, rtol=0)
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    again.load_adapter(tmp_path, adapter_name="other", subfolder="other")
    again.set_adapter("other")
    torch.testing.assert_close(out(again, inputs), other, atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match=r"subfolder='nope'.*hold an adapter: \['other'\]"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, subfolder="nope")


def test_subfolder_matches_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    inputs, _, other = two_adapters_saved(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path), subfolder="other")
    torch.testing.assert_close(out(theirs, inputs), other, atol=1e-5, rtol=0)


def test_harmless_peft_keywords_are_accepted(tmp_path: Path) -> None:
    inputs, default, other = two_adapters_saved(tmp_path)
    loaded = PeftModel.from_pretrained(
        tiny_llama(),
        tmp_path,
        low_cpu_mem_usage=True,
        ephemeral_gpu_offload=False,
        torch_device="cpu",
        token=None,
        cache_dir=str(tmp_path),
        revision=None,
    )
    torch.testing.assert_close(out(loaded, inputs), default, atol=0, rtol=0)
    loaded.load_adapter(tmp_path / "other", "other", torch_device="cpu", low_cpu_mem_usage=True)
    loaded.set_adapter("other")
    torch.testing.assert_close(out(loaded, inputs), other, atol=0, rtol=0)
    with pytest.warns(UserWarning, match="autocast_adapter_dtype=False is not supported"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, autocast_adapter_dtype=False)


def test_unknown_keywords_are_refused_not_swallowed(tmp_path: Path) -> None:
    two_adapters_saved(tmp_path)
    with pytest.raises(TypeError, match=r"from_pretrained\(\) got unexpected keyword.*\['sub_folder'\]"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, sub_folder="other")
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with pytest.raises(TypeError, match=r"load_adapter\(\) got unexpected keyword.*\['device_map'\]"):
        model.load_adapter(tmp_path / "other", "other", device_map="auto")
    with pytest.raises(ValueError, match="revision='v2'.*local folders only"):
        model.load_adapter(tmp_path / "other", "other", revision="v2")
    assert list(model.peft_config) == ["default"]  # refused before anything changed
    with pytest.raises(TypeError, match=r"save_pretrained\(\) got unexpected keyword.*\['max_shard_sise'\]"):
        model.save_pretrained(tmp_path / "x", max_shard_sise="1GB")
    with pytest.raises(ValueError, match="save_embedding_layers=True"):
        model.save_pretrained(tmp_path / "x", save_embedding_layers=True)
    assert not (tmp_path / "x").exists()


def test_not_main_process_writes_nothing(tmp_path: Path) -> None:
    model, _ = trained("llama")
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    model.save_pretrained(tmp_path / "rank0", is_main_process=True)
    assert (tmp_path / "rank0" / WEIGHTS_NAME).is_file()


def test_key_mapping_renames_saved_keys_like_peft(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model, inputs = trained("llama")
    model.save_pretrained(tmp_path)
    # A file written for a model whose blocks were called "blocks": key_mapping maps them back.
    state = load_file(str(tmp_path / WEIGHTS_NAME))
    renamed = {k.replace(".model.layers.", ".model.blocks."): v for k, v in state.items()}
    assert renamed.keys() != state.keys()
    save_file(renamed, str(tmp_path / WEIGHTS_NAME))
    mapping = {r"^model\.blocks\.": "model.layers."}
    with pytest.raises(ValueError, match="fit no module"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, key_mapping=mapping)
    torch.testing.assert_close(out(loaded, inputs), out(model, inputs), atol=0, rtol=0)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path), key_mapping=mapping)
    torch.testing.assert_close(out(theirs, inputs), out(model, inputs), atol=1e-5, rtol=0)


# -- failures that leave the caller's model as it was ---------------------------------------
def bad_shape_copy(src: Path, dst: Path) -> None:
    """``dst``: the adapter in ``src`` with its last tensor's shape broken (r columns → 3)."""
    from safetensors.torch import save_file

    state = load_file(str(src / WEIGHTS_NAME))
    last = sorted(state)[-1]
    state[last] = torch.zeros(state[last].shape[0], 3)
    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    save_file(state, str(dst / WEIGHTS_NAME))


def test_failed_from_pretrained_restores_the_base_and_a_retry_works(tmp_path: Path) -> None:
    model, inputs = trained("llama")
    model.save_pretrained(tmp_path / "good")
    bad_shape_copy(tmp_path / "good", tmp_path / "bad")
    base = tiny_llama()
    base.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # the caller's own choice, kept
    modules = dict(base.named_modules())
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    with pytest.raises(ValueError, match="Shape mismatch"):
        PeftModel.from_pretrained(base, tmp_path / "bad")
    assert dict(base.named_modules()) == modules
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    loaded = PeftModel.from_pretrained(base, tmp_path / "good")
    torch.testing.assert_close(out(loaded, inputs), out(model, inputs), atol=0, rtol=0)


def test_failed_load_adapter_removes_the_layers_it_added(tmp_path: Path) -> None:
    model, inputs = trained("llama")  # q, v, up, down
    model.save_pretrained(tmp_path / "good")
    bad_shape_copy(tmp_path / "good", tmp_path / "bad")
    target = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    modules = dict(target.named_modules())
    before = out(target, inputs)
    with pytest.raises(ValueError, match="Shape mismatch"):
        target.load_adapter(tmp_path / "bad", adapter_name="x")
    assert dict(target.named_modules()) == modules  # v_proj, up_proj, down_proj unwrapped again
    assert list(target.peft_config) == ["default"]
    torch.testing.assert_close(out(target, inputs), before, atol=0, rtol=0)


def with_extra(src: Path, dst: Path, extra: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    save_file({**load_file(str(src / WEIGHTS_NAME)), **extra}, str(dst / WEIGHTS_NAME))


def test_base_model_tensors_in_an_adapter_file_are_refused(tmp_path: Path) -> None:
    model, inputs = trained("llama")
    model.save_pretrained(tmp_path / "good")
    with_extra(
        tmp_path / "good", tmp_path / "extra", {"base_model.model.lm_head.weight": torch.zeros(96, 32)}
    )
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "good")
    before = out(loaded, inputs)
    with pytest.raises(ValueError, match=r"name weights of the base model.*\['lm_head.weight'\]"):
        loaded.load_adapter(tmp_path / "extra", "b")
    assert list(loaded.peft_config) == ["default"]
    assert not torch.equal(loaded.get_base_model().lm_head.weight, torch.zeros(96, 32))
    torch.testing.assert_close(out(loaded, inputs), before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="name weights of the base model"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "extra")


def test_peft_style_embedding_base_weight(tmp_path: Path) -> None:
    """PEFT saves a targeted embedding's full base table: taken when equal to the model's (a no-op)
    or when the adapter is the model's only one (as PEFT does); refused when it would change the
    base under another adapter."""
    model, inputs = trained("llama", modules_to_save=None)
    model.add_adapter(
        "e", LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    )
    model.save_pretrained(tmp_path)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    table = tiny_llama().model.embed_tokens.weight.detach()
    with_extra(tmp_path / "e", tmp_path / "same", {key: table.clone()})
    with_extra(tmp_path / "e", tmp_path / "resized", {key: table + 1.0})
    host = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    before = out(host, inputs)
    host.load_adapter(tmp_path / "same", "same")  # equal values: nothing to change
    with pytest.raises(ValueError, match=r"base-model weights .*embed_tokens.base_layer.weight.*differ"):
        host.load_adapter(tmp_path / "resized", "resized")
    assert sorted(host.peft_config) == ["default", "same"]
    torch.testing.assert_close(out(host, inputs), before, atol=0, rtol=0)
    alone = PeftModel.from_pretrained(tiny_llama(), tmp_path / "resized")
    assert torch.equal(alone.get_base_model().model.embed_tokens.base_layer.weight, table + 1.0)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "resized"))
    torch.testing.assert_close(out(alone, inputs), out(theirs, inputs), atol=1e-5, rtol=0)


def test_loading_into_a_meta_model_assigns_the_adapter(tmp_path: Path) -> None:
    """As PEFT's low_cpu_mem_usage loading: the adapter's tensors are assigned (not skipped), and the
    base weights loaded afterwards with assign=True give the saved model's outputs."""
    model, inputs = trained("llama")
    model.save_pretrained(tmp_path)
    with torch.device("meta"):
        empty = tiny_llama()
    with pytest.warns(UserWarning, match="meta device.*assign=True"):
        loaded = PeftModel.from_pretrained(empty, tmp_path)
    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    a = loaded.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert not a.is_meta
    assert torch.equal(a, saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])
    base_state = {k: v for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    loaded.get_base_model().load_state_dict(base_state, assign=True, strict=False)
    for name, buffer in model.get_base_model().named_buffers():  # non-persistent ones (RoPE inv_freq)
        owner, _, leaf = name.rpartition(".")
        loaded.get_base_model().get_submodule(owner).register_buffer(leaf, buffer.clone(), persistent=False)
    assert not any(p.is_meta for p in loaded.parameters())
    torch.testing.assert_close(out(loaded, inputs), out(model, inputs), atol=0, rtol=0)


@pytest.mark.parametrize("text", ["[1, 2]", '"LORA"', "3"])
def test_config_that_is_not_a_json_object_is_a_clear_error(text: str, tmp_path: Path) -> None:
    model, _ = trained("llama")
    model.save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(ValueError, match="not an object.*not an adapter config"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    from deltatune.config import config_from_dict

    with pytest.raises(ValueError, match="must be a JSON object"):
        config_from_dict([1, 2])  # type: ignore[arg-type]


def test_an_adapter_loaded_for_inference_gives_the_same_outputs_every_time(tmp_path: Path) -> None:
    model, inputs = trained("llama", lora_dropout=0.5)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(out(loaded, inputs), out(loaded, inputs), rtol=0, atol=0)
    for name, trainable in [("again", False), ("trainable", True)]:  # into a model in eval mode
        loaded.load_adapter(tmp_path, adapter_name=name, is_trainable=trainable)
        loaded.set_adapter(name)
        torch.testing.assert_close(out(loaded, inputs), out(loaded, inputs), rtol=0, atol=0)
        assert not any(m.training for m in loaded.modules() if isinstance(m, torch.nn.Dropout))
    loaded.train()  # training mode: the dropout of a loaded adapter is on
    assert not torch.equal(out(loaded, inputs), out(loaded, inputs))


@pytest.mark.parametrize("is_trainable", [False, True])
def test_load_adapter_sets_train_or_eval_mode_as_peft(tmp_path: Path, is_trainable: bool) -> None:
    """PEFT's load_adapter puts the whole model in eval mode unless the adapter is loaded to train."""
    import peft

    model, _ = trained("llama", lora_dropout=0.5)
    model.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True).train()
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path), is_trainable=True).train()
    ours.load_adapter(tmp_path, adapter_name="other", is_trainable=is_trainable)
    theirs.load_adapter(str(tmp_path), adapter_name="other", is_trainable=is_trainable)
    assert ours.training == theirs.training == is_trainable
    assert ours.get_base_model().training == theirs.get_base_model().training == is_trainable
