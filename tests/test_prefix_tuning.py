"""Prefix tuning: trainable key/value prefixes for every attention layer, given as the KV cache."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from deltatune import PeftModel, PrefixTuningConfig, get_peft_model
from helpers import (
    MLP,
    VIRTUAL_TOKEN_TASKS,
    llama3_8b_meta,
    no_eos,
    randomize_prompt,
    tiny_llama,
    token_ids,
    trainable_report,
)


def ids(batch: int = 2, length: int = 6, seed: int = 1) -> torch.Tensor:
    return token_ids(batch, length, seed)


N = 3
TASKS = VIRTUAL_TOKEN_TASKS


def wrap(name: str, seed: int = 5, n: int = N, **kw: Any) -> PeftModel:
    factory, task = TASKS[name]
    model = get_peft_model(no_eos(factory()), PrefixTuningConfig(task_type=task, num_virtual_tokens=n, **kw))
    randomize_prompt(model, seed)
    return model


# -- parameters ---------------------------------------------------------------------------
def test_llama3_8b_parameter_report_uses_kv_heads() -> None:
    model = get_peft_model(llama3_8b_meta(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10))
    assert (
        trainable_report(model)
        == "trainable params: 655,360 || all params: 8,030,916,608 || trainable%: 0.0082"
    )
    cfg = model.peft_config["default"]
    assert (cfg.token_dim, cfg.num_attention_heads, cfg.num_layers) == (1024, 8, 32)  # 128 × 8 KV heads


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_12_layer_768_model_has_184320(arch: str) -> None:
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        base = (
            GPT2LMHeadModel(GPT2Config(n_embd=768, n_layer=12, n_head=12))
            if arch == "gpt2"
            else BertModel(BertConfig())
        )
    model = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=10))
    assert model.get_nb_trainable_parameters()[0] == 184_320 == 10 * 768 * 2 * 12


def test_tiny_llama_prefix_width_is_gqa() -> None:
    model = wrap("llama")
    # head_dim 8 × 2 KV heads × 2 (K, V) × 2 layers
    assert tuple(model.prompt_encoder["default"].embedding.weight.shape) == (N, 2 * 2 * 16)


def test_projection_trains_the_mlp_but_saves_only_prefixes(tmp_path: Any) -> None:
    model = wrap("llama", prefix_projection=True, encoder_hidden_size=24)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        "prompt_encoder.default.embedding.weight",
        "prompt_encoder.default.transform.0.bias",
        "prompt_encoder.default.transform.0.weight",
        "prompt_encoder.default.transform.2.bias",
        "prompt_encoder.default.transform.2.weight",
    ]
    model.train()
    x = ids()
    model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    model.eval()
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert list(saved) == ["prompt_embeddings"] and tuple(saved["prompt_embeddings"].shape) == (N, 64)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)  # the MLP is gone
    assert [n for n, _ in loaded.named_parameters() if "prompt_encoder" in n] == [
        "prompt_encoder.default.embedding.weight"
    ]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=1e-6)


# -- what reaches attention ---------------------------------------------------------------
def test_every_layer_gets_its_own_key_and_value_prefix() -> None:
    from transformers import DynamicCache

    model = wrap("llama")
    x = ids(1)
    caches: list[Any] = []

    def spy(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        caches.append(kwargs["cache"])

    handle = model.get_base_model().register_forward_pre_hook(spy, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=x)
    handle.remove()
    cache = caches[0]
    assert isinstance(cache, DynamicCache)
    table = model.prompt_encoder["default"].embedding.weight.view(N, 2, 2, 2, 8)  # n, layer, K/V, head, dim
    for layer in range(2):
        keys, values = cache.layers[layer].keys, cache.layers[layer].values  # (1, heads, n + L, dim)
        torch.testing.assert_close(keys[0, :, :N], table[:, layer, 0].transpose(0, 1))
        torch.testing.assert_close(values[0, :, :N], table[:, layer, 1].transpose(0, 1))


# -- generate -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("argument", ["past_key_values", "cache"])
def test_continuing_from_a_returned_cache_equals_one_forward(name: str, argument: str) -> None:
    """Feeding the cache of a first call back (under either name transformers 5 accepts) gives
    the logits of one forward over the whole sequence: the prefix is not added a second time."""
    model = wrap(name)
    x = ids()
    mask = torch.ones_like(x)
    with torch.no_grad():
        full = model(input_ids=x, attention_mask=mask).logits
        first = model(input_ids=x[:, :5], attention_mask=mask[:, :5], use_cache=True)
        rest = model(input_ids=x[:, 5:], attention_mask=mask, **{argument: first.past_key_values}).logits
    torch.testing.assert_close(rest, full[:, 5:], rtol=1e-5, atol=1e-5)


def test_a_mask_in_the_cache_slot_is_refused() -> None:
    """GPT-2's second positional argument is the cache: a mask passed there is an error, not
    silently replaced by the prefix cache."""
    model = wrap("gpt2")
    x = ids()
    with pytest.raises(ValueError, match="got a Tensor, not a key/value cache"):
        model(x, torch.ones_like(x))


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_generate_sampling(name: str) -> None:
    model = wrap(name)
    x = ids()
    greedy = model.generate(input_ids=x, max_new_tokens=5, do_sample=False)
    torch.manual_seed(0)
    assert torch.equal(model.generate(input_ids=x, max_new_tokens=5, do_sample=True, top_k=1), greedy)
    torch.manual_seed(3)
    a = model.generate(input_ids=x, max_new_tokens=5, do_sample=True, temperature=1.5)
    torch.manual_seed(3)
    assert torch.equal(a, model.generate(input_ids=x, max_new_tokens=5, do_sample=True, temperature=1.5))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_generate_with_left_padding_matches_unpadded(name: str) -> None:
    model = wrap(name)
    x = ids(2, 6)
    short = x[1:, :3]
    batch = torch.cat([x[:1], torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
    alone = model.generate(input_ids=short, max_new_tokens=5, do_sample=False)
    assert torch.equal(out[1, 6:], alone[0, 3:])
    assert torch.equal(out[0], model.generate(input_ids=x[:1], max_new_tokens=5, do_sample=False)[0])


# -- files and PEFT -----------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TASKS))
def test_saved_tensor_is_one_row_of_keys_and_values_per_token(name: str, tmp_path: Any) -> None:
    model = wrap(name)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    layers, d_kv = 2, 32 if name != "llama" else 16
    assert tuple(saved["prompt_embeddings"].shape) == (N, 2 * layers * d_kv)
    torch.testing.assert_close(saved["prompt_embeddings"], model.prompt_encoder["default"].embedding.weight)


# -- mixed batches ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_mixed_batch_generate(name: str) -> None:
    model = wrap(name, seed=5)
    model.add_adapter("other", PrefixTuningConfig(task_type=TASKS[name][1], num_virtual_tokens=N))
    randomize_prompt(model, 9)
    x = ids(3)
    out = model.generate(
        input_ids=x, max_new_tokens=5, do_sample=False, adapter_names=["other", "__base__", "default"]
    )
    first = model.generate(input_ids=x, max_new_tokens=5, do_sample=False)
    with model.disable_adapter():
        base = model.generate(input_ids=x, max_new_tokens=5, do_sample=False)
    model.set_adapter("other")
    other = model.generate(input_ids=x, max_new_tokens=5, do_sample=False)
    assert torch.equal(out[0], other[0]) and torch.equal(out[1], base[1]) and torch.equal(out[2], first[2])


# -- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, -1, None])
def test_num_virtual_tokens_must_be_positive(n: Any) -> None:
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)


def test_input_too_long_once_prefix_is_added() -> None:
    model = wrap("gpt2", n=4)  # n_positions=64
    with pytest.raises(ValueError, match=r"63 tokens.*67 positions.*64.*by 3 token"):
        model(input_ids=torch.ones(1, 63, dtype=torch.long))


def test_model_whose_attention_takes_no_cache_is_refused() -> None:
    with pytest.raises(ValueError, match=r"MLP has no forward .* accepts a cache"):
        get_peft_model(
            MLP(), PrefixTuningConfig(num_virtual_tokens=2, token_dim=8, num_layers=1, num_attention_heads=1)
        )


def test_gradient_checkpointing_is_refused_clearly() -> None:
    model = wrap("llama")
    model.gradient_checkpointing_enable()
    model.train()
    x = ids()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(input_ids=x, labels=x)
    model.eval()
    with torch.no_grad():
        model(input_ids=x)  # inference is unaffected


def test_merge_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot be merged"):
        wrap("gpt2").merge_adapter()


def test_trainable_load_of_projected_adapter_trains_the_prefixes(tmp_path: Any) -> None:
    model = wrap("llama", prefix_projection=True)
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="reparameterisation MLP"):
        again = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    trainable = [n for n, p in again.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_encoder.default.embedding.weight"]
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=1e-6)
