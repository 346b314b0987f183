"""Prompt tuning: soft tokens in front of the input embeddings."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from deltatune import PeftModel, PromptTuningConfig, get_peft_model
from helpers import (
    VIRTUAL_TOKEN_TASKS,
    llama3_8b_meta,
    no_eos,
    randomize_prompt,
    tiny_bert,
    tiny_llama,
    token_ids,
    trainable_report,
)


def ids(batch: int = 2, length: int = 6, seed: int = 1) -> torch.Tensor:
    return token_ids(batch, length, seed)


N = 4
TASKS = VIRTUAL_TOKEN_TASKS


def wrap(name: str, seed: int = 5, n: int = N, **kw: Any) -> PeftModel:
    factory, task = TASKS[name]
    model = get_peft_model(no_eos(factory()), PromptTuningConfig(task_type=task, num_virtual_tokens=n, **kw))
    randomize_prompt(model, seed)
    return model


# -- parameters ---------------------------------------------------------------------------
def test_llama3_8b_parameter_report() -> None:
    model = get_peft_model(llama3_8b_meta(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20))
    assert (
        trainable_report(model)
        == "trainable params: 81,920 || all params: 8,030,343,168 || trainable%: 0.0010"
    )


# -- forward ------------------------------------------------------------------------------
def test_forward_is_the_base_model_on_prompt_then_text() -> None:
    model = wrap("llama")
    x = ids()
    prompt = model.prompt_encoder["default"].embedding.weight
    embeds = torch.cat([prompt.expand(2, -1, -1), model.get_base_model().get_input_embeddings()(x)], 1)
    with torch.no_grad():
        ours = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
        ref = model.base_model(inputs_embeds=embeds, attention_mask=torch.ones(2, N + 6)).logits
    assert ours.shape == (2, N + 6, 96)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_mask_gets_ones_and_labels_get_minus_100() -> None:
    model = wrap("llama")
    seen: dict[str, torch.Tensor] = {}

    def spy(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.update({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    handle = model.get_base_model().register_forward_pre_hook(spy, with_kwargs=True)
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    out = model(input_ids=x, attention_mask=mask, labels=x)
    handle.remove()
    assert seen["attention_mask"].tolist() == [[1] * N + row for row in mask.tolist()]
    assert seen["labels"].tolist() == [[-100] * N + row for row in x.tolist()]
    # Only real tokens are targets (the first one is predicted from the last virtual token).
    logits = out.logits[:, N - 1 : -1]
    ref = nn.functional.cross_entropy(logits.reshape(-1, 96), x.reshape(-1))
    torch.testing.assert_close(out.loss, ref)


# -- generate -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_generate_sampling(name: str) -> None:
    model = wrap(name)
    x = ids()
    greedy = model.generate(input_ids=x, max_new_tokens=5, do_sample=False)
    torch.manual_seed(0)
    top1 = model.generate(input_ids=x, max_new_tokens=5, do_sample=True, top_k=1)
    assert torch.equal(top1, greedy)  # sampling from one candidate is greedy
    torch.manual_seed(3)
    a = model.generate(input_ids=x, max_new_tokens=5, do_sample=True, temperature=1.5)
    torch.manual_seed(3)
    b = model.generate(input_ids=x, max_new_tokens=5, do_sample=True, temperature=1.5)
    assert torch.equal(a, b) and a.shape == greedy.shape


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_generate_with_left_padding_matches_unpadded(name: str) -> None:
    model = wrap(name)
    x = ids(2, 6)
    short = x[1:, :3]
    batch = torch.cat([x[:1], torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
    alone = model.generate(
        input_ids=short, attention_mask=torch.ones_like(short), max_new_tokens=5, do_sample=False
    )
    first = model.generate(input_ids=x[:1], max_new_tokens=5, do_sample=False)
    assert torch.equal(out[1, 6:], alone[0, 3:])
    assert torch.equal(out[0], first[0])


# -- init ---------------------------------------------------------------------------------
def test_sample_vocab_init_uses_vocabulary_embeddings() -> None:
    model = get_peft_model(
        tiny_llama(),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, prompt_tuning_init="SAMPLE_VOCAB"),
    )
    prompt = model.prompt_encoder["default"].embedding.weight
    vocab = model.get_base_model().get_input_embeddings().weight
    for row in prompt:
        assert (vocab - row).abs().amax(1).min() == 0  # every soft token starts as a real token's vector


def _minilm_sized_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=30522
    )
    return BertForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("how", ["path", "object"])
def test_text_init_repeats_or_cuts_the_tokenised_text(how: str) -> None:
    from transformers import AutoTokenizer

    from deltatune.assets import default_model_path

    path = str(default_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    text = "classify the sentiment"
    token_ids = tok(text)["input_ids"]  # [CLS] classify the sentiment [SEP]
    for n in (3, 12):
        kw: dict[str, Any] = {"tokenizer_name_or_path": path} if how == "path" else {"tokenizer": tok}
        model = get_peft_model(
            _minilm_sized_bert(),
            PromptTuningConfig(
                task_type="SEQ_CLS",
                num_virtual_tokens=n,
                prompt_tuning_init="TEXT",
                prompt_tuning_init_text=text,
                **kw,
            ),
        )
        expected_ids = (token_ids * n)[:n]
        vocab = model.get_base_model().get_input_embeddings().weight
        torch.testing.assert_close(model.prompt_encoder["default"].embedding.weight, vocab[expected_ids])
        assert model.peft_config["default"].tokenizer_name_or_path  # recorded for the file
        assert "tokenizer" not in model.peft_config["default"].to_dict()


# -- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, -3, None, 2.5])
def test_num_virtual_tokens_must_be_positive(n: Any) -> None:
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)


def test_text_init_without_tokenizer_is_refused() -> None:
    with pytest.raises(ValueError, match="needs a tokenizer"):
        PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")
    with pytest.raises(ValueError, match="prompt_tuning_init_text"):
        PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", tokenizer_name_or_path="/x")
    with pytest.raises(ValueError, match="not known"):
        PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="WORDS")


def test_input_too_long_once_virtual_tokens_are_added() -> None:
    model = wrap("llama", n=5)  # max_position_embeddings=64
    with pytest.raises(ValueError, match=r"62 tokens.*67 positions.*64.*by 3 token"):
        model(input_ids=torch.ones(1, 62, dtype=torch.long))
    model(input_ids=torch.ones(1, 59, dtype=torch.long))  # 59 + 5 = 64 fits


def test_merge_is_refused() -> None:
    model = wrap("llama")
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()


# -- files --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TASKS))
def test_saved_tensors_are_the_prompt_and_the_head(name: str, tmp_path: Any) -> None:
    model = wrap(name)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    rows = N * (2 if name == "t5" else 1)  # PEFT keeps n rows per transformer stack for seq2seq
    assert tuple(saved["prompt_embeddings"].shape) == (rows, 32)
    prompt = model.prompt_encoder["default"].embedding.weight  # (rows, 32) too
    torch.testing.assert_close(saved["prompt_embeddings"], prompt, rtol=0, atol=0)
    heads = sorted(k for k in saved if k != "prompt_embeddings")
    assert heads == (["base_model.classifier.bias", "base_model.classifier.weight"] if name == "bert" else [])


def test_sequence_classification_trains_and_saves_the_head(tmp_path: Any) -> None:
    model = wrap("bert")
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        "base_model.classifier.modules_to_save.default.bias",
        "base_model.classifier.modules_to_save.default.weight",
        "prompt_encoder.default.embedding.weight",
    ]
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    x = ids(4)
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=x, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=1e-6)
        assert not torch.allclose(tiny_bert()(input_ids=x).logits, model(input_ids=x).logits, atol=1e-3)


# -- PEFT interop -------------------------------------------------------------------------
# -- mixed batches ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "t5"])
def test_mixed_batch_generate(name: str) -> None:
    model = wrap(name, seed=5)
    model.add_adapter("other", PromptTuningConfig(task_type=TASKS[name][1], num_virtual_tokens=N))
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


def test_mixed_batch_needs_same_length_adapters() -> None:
    model = wrap("llama")
    model.add_adapter("long", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N + 2))
    with pytest.raises(ValueError, match="one kind and one length"):
        model(input_ids=ids(2), adapter_names=["default", "long"])


# -- learning -----------------------------------------------------------------------------
def test_prompt_tuning_learns_a_small_task() -> None:
    """A frozen tiny Llama learns to end every sequence with one fixed token.

    Weights drawn with std 0.2 (not transformers' 0.02, under which a random model passes
    almost no signal from one position to another) stand in for a pretrained model.
    """
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_llama(initializer_range=0.2), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8)
    )
    model.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 90, (16, 8), generator=g)
    x[:, -1] = 93  # every sequence ends with the same target token
    labels = torch.full_like(x, -100)
    labels[:, -1] = 93  # score only the target

    def loss() -> torch.Tensor:
        return model(input_ids=x, labels=labels).loss

    with torch.no_grad():
        start = loss().item()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(40):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        end = loss().item()
    assert end < 0.5 * start, (start, end)
