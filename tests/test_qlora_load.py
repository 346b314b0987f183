"""load_quantized: a model folder streamed straight into NF4 equals from_pretrained + quantize_model
(codes, statistics, dense tensors, buffers, logits), in bounded memory."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from torch import nn

from deltatune.quant import Linear4bit, load_quantized, quantize_model
from helpers import load_peak, random_bf16_llama_folder, tiny_llama


def save(model: nn.Module, folder: str, shard: str | None = None) -> str:
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def reference(
    folder: str, cls: type | None = None, quantize_kw: dict | None = None, **kw: object
) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = (cls or AutoModelForCausalLM).from_pretrained(folder, **kw)
    return quantize_model(model, **(quantize_kw or {}))


def assert_same_model(ref: nn.Module, got: nn.Module) -> None:
    rs, gs = ref.state_dict(), got.state_dict()
    assert rs.keys() == gs.keys()
    for key, value in rs.items():
        assert gs[key].dtype == value.dtype, key
        assert torch.equal(gs[key], value), key
    # Non-persistent buffers (rotary inv_freq) too: they are computed, not loaded.
    rb, gb = dict(ref.named_buffers()), dict(got.named_buffers())
    assert rb.keys() == gb.keys()
    for key, value in rb.items():
        assert gb[key].dtype == value.dtype and torch.equal(gb[key], value), key
    assert not any(t.is_meta for t in [*got.parameters(), *got.buffers()])
    assert not got.training


def logits(model: nn.Module) -> torch.Tensor:
    x = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=x).logits  # type: ignore[no-any-return]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("sharded", [False, True])
def test_streamed_load_equals_from_pretrained_then_quantize(tmp_path, dtype, tied, sharded):
    folder = save(tiny_llama(tie_word_embeddings=tied).to(dtype), str(tmp_path), "20KB" if sharded else None)
    assert os.path.exists(os.path.join(folder, "model.safetensors.index.json")) == sharded
    ref = reference(folder)
    got = load_quantized(folder)
    n4 = [m for m in got.modules() if isinstance(m, Linear4bit)]
    assert len(n4) == 14 and all(m.weight_dtype == dtype for m in n4)  # 7 projections x 2 layers
    assert not isinstance(got.lm_head, Linear4bit)
    assert (got.lm_head.weight is got.model.embed_tokens.weight) == tied
    assert_same_model(ref, got)
    assert torch.equal(logits(got), logits(ref))


def test_dtype_targets_and_compute_dtype_are_passed_like_quantize_model(tmp_path):
    folder = save(tiny_llama().to(torch.bfloat16), str(tmp_path))
    quantize_kw = {
        "target_modules": ["q_proj", "down_proj"],
        "skip_modules": ["layers.1"],
        "compute_dtype": torch.bfloat16,
        "block_size": 32,
        "double_quant": False,
    }
    ref = reference(folder, quantize_kw=quantize_kw, dtype=torch.float32)
    got = load_quantized(folder, dtype=torch.float32, **quantize_kw)  # type: ignore[arg-type]
    quantised = sorted(n for n, m in got.named_modules() if isinstance(m, Linear4bit))
    assert quantised == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    layer = got.get_submodule(quantised[0])
    assert layer.compute_dtype == torch.bfloat16 and layer.block_size == 32 and not layer.double_quant
    assert got.model.embed_tokens.weight.dtype == torch.float32
    assert_same_model(ref, got)
    assert torch.equal(logits(got), logits(ref))


def test_other_model_class_and_config_overrides(tmp_path):
    from transformers import AutoModelForSequenceClassification

    folder = save(tiny_llama(task="seq_cls", num_labels=3), str(tmp_path))
    ref = reference(folder, cls=AutoModelForSequenceClassification)
    got = load_quantized(folder, model_class=AutoModelForSequenceClassification)
    assert got.config.num_labels == 3 and not isinstance(got.score, Linear4bit)  # heads stay dense
    assert_same_model(ref, got)
    # A head of another size is an error unless asked to start it fresh.
    with pytest.raises(ValueError, match="ignore_mismatched_sizes"):
        load_quantized(folder, model_class=AutoModelForSequenceClassification, num_labels=5)
    with pytest.warns(UserWarning, match="score.weight"):
        fresh = load_quantized(
            folder, model_class=AutoModelForSequenceClassification, num_labels=5, ignore_mismatched_sizes=True
        )
    assert fresh.score.weight.shape == (5, 32) and fresh.score.weight.abs().sum() > 0
    with pytest.raises(TypeError, match="not_an_option"):
        load_quantized(folder, not_an_option=1)
    with pytest.raises(TypeError, match="device_map"):
        load_quantized(folder, device_map="auto")


def test_base_model_checkpoint_loads_into_a_head_model(tmp_path):
    # A folder saved from LlamaModel (keys without "model.") loads into LlamaForCausalLM; the
    # absent lm_head is initialised fresh with a warning, as from_pretrained does.
    full = tiny_llama()
    folder = save(full.model, str(tmp_path))
    with pytest.warns(UserWarning, match="lm_head.weight"):
        got = load_quantized(folder)
    assert torch.equal(got.model.embed_tokens.weight, full.model.embed_tokens.weight)
    ref_q = quantize_model(tiny_llama())
    q = got.model.layers[1].mlp.up_proj
    assert torch.equal(q.weight_packed, ref_q.model.layers[1].mlp.up_proj.weight_packed)


def test_cli_qlora_method_loads_through_load_quantized(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from deltatune.train.methods import get_method

    folder = save(tiny_llama(task="seq_cls", num_labels=2), str(tmp_path))
    load_base = get_method("qlora").load_base
    assert load_base is not None
    model = load_base(AutoModelForSequenceClassification, folder, "SEQ_CLS", {}, num_labels=2)
    assert isinstance(model.model.layers[0].mlp.down_proj, Linear4bit)
    assert_same_model(reference(folder, cls=AutoModelForSequenceClassification), model)


def test_pickle_only_folder_is_refused(tmp_path):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pickle weights only \(pytorch_model.bin\).*safetensors"):
        load_quantized(str(tmp_path))
    os.remove(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_quantized(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_quantized(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors"])
def test_index_cannot_point_outside_the_folder(tmp_path, shard):
    folder = save(tiny_llama(), str(tmp_path), "20KB")
    index_path = os.path.join(folder, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = shard
    with open(index_path, "w") as f:
        json.dump(index, f)
    with pytest.raises(ValueError, match="plain file names inside the folder"):
        load_quantized(folder)


def test_wrong_shape_in_the_files_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save(tiny_llama(), str(tmp_path))
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 32)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"q_proj.weight.*\(16, 32\).*\(32, 32\)"):
        load_quantized(folder)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_while_loading_stays_under_the_bound(tmp_path):
    # Linear weights dominate: 100 M parameters, 200 MB in bf16, about 52 MB in NF4.
    folder = str(tmp_path)
    checkpoint, largest_values = random_bf16_llama_folder(
        folder,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=1024,
    )
    largest = 2 * largest_values  # bytes in bf16
    m = load_peak(folder)
    grown = m["peak"] - m["before"]
    bound = m["model"] + largest + 64 * 2**20  # the bound load_quantized's docstring states
    assert m["model"] < 0.35 * checkpoint  # the loaded model is the 4-bit one
    assert grown <= bound, f"peak grew by {grown / 2**20:.1f} MiB; bound {bound / 2**20:.1f} MiB ({m})"
    assert grown < 0.6 * checkpoint  # far from holding the bf16 model
    assert m["after"] - m["before"] < m["model"] + 16 * 2**20  # nothing kept besides the model
