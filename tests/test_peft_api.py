"""PEFT's public names in deltatune, each checked against PEFT's own on the same tiny model: the
PeftModelFor<Task> classes (and transformers' pipeline that keys on their names), AutoPeftModel*,
inject_adapter_in_model, get/set_peft_model_state_dict (deltatune's, and PEFT's on deltatune
models), load_peft_weights, get_model_status / get_layer_status."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import deltatune as dt
from helpers import model_output, tiny_bert, tiny_llama, tiny_t5

peft = pytest.importorskip("peft")

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
IDS = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(3))

# task type -> (tiny model factory, LoRA targets, inputs)
TASKS: dict[str, tuple[Callable[[], nn.Module], list[str], dict[str, torch.Tensor]]] = {
    "CAUSAL_LM": (tiny_llama, ["q_proj", "v_proj"], {"input_ids": IDS}),
    "SEQ_CLS": (lambda: tiny_bert("seq_cls"), ["query", "value"], {"input_ids": IDS}),
    "TOKEN_CLS": (lambda: tiny_bert("token_cls"), ["query", "value"], {"input_ids": IDS}),
    "QUESTION_ANS": (lambda: tiny_bert("qa"), ["query", "value"], {"input_ids": IDS}),
    "FEATURE_EXTRACTION": (lambda: tiny_bert("feature"), ["query", "value"], {"input_ids": IDS}),
    "SEQ_2_SEQ_LM": (tiny_t5, ["q", "v"], {"input_ids": IDS, "decoder_input_ids": IDS[:, :4]}),
}


def _nonzero(model: nn.Module, seed: int = 1) -> None:
    """Give every LoRA B (zero at init) values, so that the adapter changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _pair(task: str = "CAUSAL_LM") -> tuple[Any, Any]:
    factory, targets, _ = TASKS[task]
    kw = {**LORA, "target_modules": targets, "task_type": task}
    ours, theirs = (
        dt.get_peft_model(factory(), dt.LoraConfig(**kw)),
        peft.get_peft_model(factory(), peft.LoraConfig(**kw)),
    )
    _nonzero(ours)
    _nonzero(theirs)
    return ours, theirs


# -- PeftModelFor<Task> ---------------------------------------------------------------------
@pytest.mark.parametrize("task", sorted(TASKS))
def test_get_peft_model_returns_the_task_class_peft_returns(task: str, tmp_path: Path) -> None:
    ours, theirs = _pair(task)
    assert type(ours).__name__ == type(theirs).__name__ == f"PeftModelFor{type(theirs).__name__[12:]}"
    assert type(ours) is getattr(dt, type(theirs).__name__) and isinstance(ours, dt.PeftModel)
    factory, _, x = TASKS[task]
    with torch.no_grad():
        assert torch.allclose(model_output(ours(**x)), model_output(theirs(**x)), atol=1e-5)
    ours.save_pretrained(tmp_path)
    for loader in (dt.PeftModel.from_pretrained, getattr(dt, type(theirs).__name__).from_pretrained):
        assert type(loader(factory(), tmp_path)) is type(ours)


def test_without_a_task_type_the_plain_class() -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(**LORA))
    assert type(model) is dt.PeftModel
    assert type(peft.get_peft_model(tiny_llama(), peft.LoraConfig(**LORA))).__name__ == "PeftModel"


def _word_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, **{f"w{i}": i for i in range(1, 96)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="w1")


@pytest.fixture
def transformers_errors() -> Iterator[list[str]]:
    """Messages transformers logs at ERROR level during the test."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger, handler = logging.getLogger("transformers"), Keep(logging.ERROR)
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


def test_text_generation_pipeline_accepts_the_model_and_generates_what_peft_does(
    transformers_errors: list[str],
) -> None:
    from transformers import pipeline

    ours, theirs = _pair()
    tokenizer = _word_tokenizer()
    prompt = "w5 w9 w12 w40"
    outputs = []
    for model in (ours, theirs):
        pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
        outputs.append(pipe(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"])
    assert not [m for m in transformers_errors if "is not supported" in m], transformers_errors
    assert (
        outputs[0] == outputs[1] and outputs[0].startswith("w5 w9 w12 w40") and len(outputs[0]) > len(prompt)
    )


def test_a_plain_peft_model_in_a_pipeline_is_what_transformers_complains_about(
    transformers_errors: list[str],
) -> None:
    """The check the task classes satisfy is real: without a task type, the error comes back."""
    from transformers import pipeline

    pipeline(
        "text-generation",
        model=dt.get_peft_model(tiny_llama(), dt.LoraConfig(**LORA)),
        tokenizer=_word_tokenizer(),
    )
    assert any("'PeftModel' is not supported for text-generation" in m for m in transformers_errors)


# -- AutoPeftModel* ----------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path: Path) -> Callable[[str], Path]:
    """An adapter folder whose config names a tiny base model saved in a local folder."""

    def save(task: str) -> Path:
        factory, targets, _ = TASKS[task]
        base_dir = tmp_path / f"base-{task}"
        factory().save_pretrained(base_dir)
        kw = {**LORA, "target_modules": targets, "task_type": task}
        auto = getattr(__import__("transformers"), dt.task_models._BY_TASK[task][1])
        model = dt.get_peft_model(auto.from_pretrained(base_dir), dt.LoraConfig(**kw))
        _nonzero(model)
        assert model.peft_config["default"].base_model_name_or_path == str(base_dir)
        model.save_pretrained(tmp_path / f"adapter-{task}")
        return tmp_path / f"adapter-{task}"

    return save


@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM"])
def test_auto_peft_model_loads_base_and_adapter_as_peft_does(task: str, saved: Callable[[str], Path]) -> None:
    folder = saved(task)
    name = "AutoPeftModelFor" + dt.task_models._BY_TASK[task][0].__name__[len("PeftModelFor") :]
    ours, theirs = getattr(dt, name).from_pretrained(folder), getattr(peft, name).from_pretrained(folder)
    assert type(ours).__name__ == type(theirs).__name__ and not ours.training
    x = TASKS[task][2]
    with torch.no_grad():
        got, want = model_output(ours(**x)), model_output(theirs(**x))
        with ours.disable_adapter():
            base = model_output(ours(**x))
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, base, atol=1e-3)
    trainable = getattr(dt, name).from_pretrained(folder, is_trainable=True, adapter_name="mine")
    assert trainable.active_adapter == "mine" and trainable.get_nb_trainable_parameters()[0] > 0


def test_auto_peft_model_passes_loading_keywords_to_the_base(saved: Callable[[str], Path]) -> None:
    model = dt.AutoPeftModelForCausalLM.from_pretrained(saved("CAUSAL_LM"), dtype=torch.float64)
    assert model.get_base_model().model.embed_tokens.weight.dtype == torch.float64


def test_auto_peft_model_refuses_the_wrong_task_and_a_missing_base(
    saved: Callable[[str], Path], tmp_path: Path
) -> None:
    folder = saved("CAUSAL_LM")
    with pytest.raises(ValueError, match="AutoPeftModelForCausalLM"):
        dt.AutoPeftModelForSequenceClassification.from_pretrained(folder)
    with pytest.raises(ValueError, match="AutoPeftModelForCausalLM"):
        dt.AutoPeftModel.from_pretrained(folder)
    with pytest.raises(OSError, match="from_pretrained"):
        dt.AutoPeftModelForCausalLM()
    with pytest.raises(FileNotFoundError, match="snapshot_download"):
        dt.AutoPeftModelForCausalLM.from_pretrained("some-user/some-adapter")
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(**LORA, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "nobase")  # built from a config: no base path to record
    with pytest.raises(ValueError, match="names no base model"):
        dt.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "nobase")


def test_auto_peft_model_without_task_reads_only_transformers_classes(tmp_path: Path) -> None:
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    from transformers import LlamaForCausalLM

    model = dt.get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), dt.LoraConfig(**LORA))
    _nonzero(model)
    config = model.peft_config["default"]
    config.auto_mapping = {
        "base_model_class": "LlamaForCausalLM",
        "parent_library": "transformers.models.llama",
    }
    model.save_pretrained(tmp_path / "a")
    loaded = dt.AutoPeftModel.from_pretrained(tmp_path / "a")
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-6)
    config.auto_mapping = {"base_model_class": "system", "parent_library": "os"}
    model.save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="names no transformers model class"):
        dt.AutoPeftModel.from_pretrained(tmp_path / "b")


# -- inject_adapter_in_model -------------------------------------------------------------------
def test_inject_adapter_in_model_matches_peft() -> None:
    kw = {**LORA, "task_type": "CAUSAL_LM"}
    base = tiny_llama()
    ours = dt.inject_adapter_in_model(dt.LoraConfig(**kw), base)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**kw), tiny_llama())
    assert ours is base and type(ours).__name__ == "LlamaForCausalLM"
    assert list(ours.peft_config) == ["default"] and ours.peft_config["default"].r == 4
    assert list(ours.state_dict()) == list(theirs.state_dict())
    grads = [(n, p.requires_grad) for n, p in ours.named_parameters()]
    assert grads == [(n, p.requires_grad) for n, p in theirs.named_parameters()]
    assert any(g for _, g in grads)
    theirs.load_state_dict(ours.state_dict())
    _nonzero(ours)
    _nonzero(theirs)
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-5)


def test_inject_adapter_in_model_refuses_what_peft_refuses() -> None:
    with pytest.raises(ValueError, match="prompt learning"):
        dt.inject_adapter_in_model(
            dt.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), tiny_llama()
        )
    model = dt.inject_adapter_in_model(dt.LoraConfig(**LORA), tiny_llama())
    with pytest.raises(ValueError, match="already"):
        dt.inject_adapter_in_model(dt.LoraConfig(**LORA), model)
    with pytest.raises(ValueError, match="target_modules"):
        dt.inject_adapter_in_model(dt.LoraConfig(**LORA), tiny_llama(), state_dict={})


# -- get/set_peft_model_state_dict ------------------------------------------------------------
def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_state_dict_functions_match_peft_on_a_wrapper() -> None:
    ours, theirs = _pair()
    theirs.load_state_dict(ours.state_dict())
    mine = dt.get_peft_model_state_dict(ours)
    assert _same(mine, peft.get_peft_model_state_dict(theirs)) and len(mine) == 8
    assert not any(v.requires_grad for v in mine.values())
    assert _same(dt.get_peft_model_state_dict(ours, state_dict=ours.state_dict()), mine)
    # Loading another adapter's values: the result PEFT's function returns, and PEFT's outputs.
    other, theirs2 = _pair()
    _nonzero(theirs2, seed=7)
    values = peft.get_peft_model_state_dict(theirs2)
    got, want = dt.set_peft_model_state_dict(other, values), peft.set_peft_model_state_dict(theirs2, values)
    assert got.missing_keys == want.missing_keys and got.unexpected_keys == want.unexpected_keys == []
    assert len(got.missing_keys) == len(other.state_dict()) - 8
    with torch.no_grad():
        assert torch.allclose(other(input_ids=IDS).logits, theirs2(input_ids=IDS).logits, atol=1e-5)


def test_state_dict_functions_on_a_model_injected_in_place() -> None:
    ours = dt.inject_adapter_in_model(dt.LoraConfig(**LORA), tiny_llama())
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**LORA), tiny_llama())
    _nonzero(theirs)
    values = peft.get_peft_model_state_dict(theirs)
    assert list(dt.get_peft_model_state_dict(ours)) == list(values)
    got, want = dt.set_peft_model_state_dict(ours, values), peft.set_peft_model_state_dict(theirs, values)
    assert (got.missing_keys, got.unexpected_keys) == (want.missing_keys, want.unexpected_keys)
    assert _same(dt.get_peft_model_state_dict(ours), values)
    # keys as a wrapper's file has them (base_model.model.) load too, as in PEFT
    dt.set_peft_model_state_dict(ours, {"base_model.model." + k: v * 2 for k, v in values.items()})
    assert _same(dt.get_peft_model_state_dict(ours), {k: v * 2 for k, v in values.items()})


def test_set_peft_model_state_dict_refuses_what_does_not_fit_and_changes_nothing() -> None:
    ours, _ = _pair()
    before = dt.get_peft_model_state_dict(ours)
    values = {k: v.clone() for k, v in before.items()}
    key = next(iter(values))
    values[key] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="Shape mismatch"):
        dt.set_peft_model_state_dict(ours, {k: v + 1 if k != key else v for k, v in values.items()})
    assert _same(dt.get_peft_model_state_dict(ours), before)
    with pytest.raises(ValueError, match="No adapter named 'other'"):
        dt.set_peft_model_state_dict(ours, before, adapter_name="other")
    with pytest.raises(ValueError, match="ignore_mismatched_sizes"):
        dt.set_peft_model_state_dict(ours, before, ignore_mismatched_sizes=True)
    with pytest.raises(TypeError, match="no deltatune adapter"):
        dt.get_peft_model_state_dict(tiny_llama())


def test_peft_functions_work_on_deltatune_models() -> None:
    """PEFT's own get/set_peft_model_state_dict (what accelerate's FSDP saving and TRL call) on a
    deltatune model: the adapter's tensors, not {} and not a silent no-op."""
    ours, theirs = _pair()
    assert _same(peft.get_peft_model_state_dict(ours), dt.get_peft_model_state_dict(ours))
    _nonzero(theirs, seed=9)
    values = peft.get_peft_model_state_dict(theirs)
    result = peft.set_peft_model_state_dict(ours, values)
    assert result.unexpected_keys == [] and _same(dt.get_peft_model_state_dict(ours), values)
    from peft.utils import save_and_load

    assert _same(save_and_load.get_peft_model_state_dict(ours), values)  # the module PEFT's code imports from
    injected = dt.inject_adapter_in_model(dt.LoraConfig(**LORA), tiny_llama())
    assert list(peft.get_peft_model_state_dict(injected)) == [
        k.removeprefix("base_model.model.") for k in values
    ]
    # PEFT's own models still go to PEFT's functions
    assert _same(peft.get_peft_model_state_dict(theirs), values)


def test_peft_functions_are_peft_own_again_after_disable() -> None:
    dt.get_peft_model(tiny_llama(), dt.LoraConfig(**LORA))
    from peft.utils import save_and_load

    try:
        dt.integrations.disable()
        assert peft.get_peft_model_state_dict is save_and_load.get_peft_model_state_dict
        assert not hasattr(peft.get_peft_model_state_dict, "_deltatune_original")
    finally:
        dt.integrations.enable()
    assert peft.get_peft_model_state_dict._deltatune_original is not None


# -- load_peft_weights -----------------------------------------------------------------------
def test_load_peft_weights_matches_peft_and_refuses_pickles(tmp_path: Path) -> None:
    ours, _ = _pair()
    ours.save_pretrained(tmp_path / "a")
    mine, theirs = (
        dt.load_peft_weights(tmp_path / "a", device="cpu"),
        peft.load_peft_weights(str(tmp_path / "a"), device="cpu"),
    )
    assert _same(dict(sorted(mine.items())), dict(sorted(theirs.items()))) and len(mine) == 8
    renamed = dt.load_peft_weights(tmp_path / "a", device="cpu", key_mapping={r"^model\.": "decoder."})
    assert all(k.startswith("base_model.model.decoder.") for k in renamed)
    (tmp_path / "p").mkdir()
    torch.save(mine, tmp_path / "p" / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        dt.load_peft_weights(tmp_path / "p", device="cpu")
    with pytest.raises(FileNotFoundError, match="local adapter folders"):
        dt.load_peft_weights("some-user/some-adapter")


# -- get_model_status / get_layer_status ------------------------------------------------------
# Fields that name classes, which are deltatune's own (e.g. "TunerModel" where PEFT has "LoraModel").
_CLASS_FIELDS = {"adapter_model_type"}


def _fields(status: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(status).items() if k not in _CLASS_FIELDS}


def _status_pair(ours: Any, theirs: Any) -> None:
    from peft.peft_model import TunerLayerStatus, TunerModelStatus

    for mine, theirs_cls in (
        (dt.TunerModelStatus, TunerModelStatus),
        (dt.TunerLayerStatus, TunerLayerStatus),
    ):
        assert [f.name for f in dataclasses.fields(mine)] == [f.name for f in dataclasses.fields(theirs_cls)]
    assert _fields(dt.get_model_status(ours)) == _fields(peft.get_model_status(theirs))
    assert [_fields(s) for s in dt.get_layer_status(ours)] == [
        _fields(s) for s in peft.get_layer_status(theirs)
    ]


def test_status_matches_peft_through_adapter_changes() -> None:
    ours, theirs = _pair("SEQ_CLS")  # with a modules_to_save head
    _status_pair(ours, theirs)
    factory, targets, _ = TASKS["SEQ_CLS"]
    for model, lib in ((ours, dt), (theirs, peft)):
        model.add_adapter("other", lib.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    _status_pair(ours, theirs)
    for model in (ours, theirs):
        model.set_adapter("other")
        model.merge_adapter()
    _status_pair(ours, theirs)
    for model in (ours, theirs):
        model.unmerge_adapter()
        model.base_model.disable_adapter_layers()
    _status_pair(ours, theirs)
    assert dt.get_model_status(ours).enabled is False
    assert dt.get_model_status(ours).adapter_model_type == "TunerModel"
    assert (
        dt.get_layer_status(ours)[0].module_type
        == peft.get_layer_status(theirs)[0].module_type
        == "lora.Linear"
    )


def test_status_of_a_model_injected_in_place_and_refusals() -> None:
    ours = dt.inject_adapter_in_model(dt.LoraConfig(**LORA), tiny_llama())
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**LORA), tiny_llama())
    assert dataclasses.asdict(dt.get_model_status(ours)) == dataclasses.asdict(peft.get_model_status(theirs))
    with pytest.raises(ValueError, match="No adapter layers"):
        dt.get_model_status(tiny_llama())
    prompt = dt.get_peft_model(
        tiny_llama(), dt.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    )
    with pytest.raises(TypeError, match="prompt and prefix tuning"):
        dt.get_layer_status(prompt)


def test_prepare_model_for_kbit_training_is_exported() -> None:
    from deltatune.quant import prepare_model_for_kbit_training

    assert dt.prepare_model_for_kbit_training is prepare_model_for_kbit_training
    assert {"prepare_model_for_kbit_training", "AutoPeftModelForCausalLM", "get_model_status"} <= set(
        dt.__all__
    )


def test_peft_names_as_trainers_see_them_take_deltatune_configs() -> None:
    """While the bridge is on: peft.PeftConfig's check accepts deltatune configs, peft.get_peft_model
    builds a deltatune model from one (what TRL's peft_config= calls), and PEFT's
    inject_adapter_in_model (transformers' add_adapter) refuses one clearly; PEFT configs as before."""
    config = dt.LoraConfig(**LORA, task_type="CAUSAL_LM")
    assert isinstance(config, peft.PeftConfig) and isinstance(peft.LoraConfig(), peft.PeftConfig)
    assert not isinstance(config, peft.config.PeftConfig)  # PEFT's own modules keep PEFT's class
    assert type(peft.get_peft_model(tiny_llama(), config)) is dt.PeftModelForCausalLM
    assert type(peft.get_peft_model(tiny_llama(), peft.LoraConfig(**LORA))).__module__.startswith("peft.")
    with pytest.raises(TypeError, match="deltatune.get_peft_model"):
        peft.inject_adapter_in_model(config, tiny_llama())
    assert (
        type(peft.inject_adapter_in_model(peft.LoraConfig(**LORA), tiny_llama())).__name__
        == "LlamaForCausalLM"
    )


def test_auto_peft_model_grows_the_vocabulary_to_the_saved_tokenizer(tmp_path: Path) -> None:
    """An adapter trained after adding tokens (tokenizer saved beside it, embeddings as
    modules_to_save): the base's embeddings are resized to the tokenizer first, as PEFT does."""
    from tokenizers import AddedToken
    from transformers import LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    tokenizer = _word_tokenizer()
    tokenizer.add_tokens([AddedToken(f"new{i}") for i in range(4)])
    assert len(tokenizer) == 100
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    base.resize_token_embeddings(len(tokenizer))
    config = dt.LoraConfig(**LORA, task_type="CAUSAL_LM", modules_to_save=["embed_tokens", "lm_head"])
    model = dt.get_peft_model(base, config)
    _nonzero(model)
    model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    ours = dt.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[5, 9, 97, 99, 12]])
    with torch.no_grad():
        got = ours(input_ids=ids).logits
        assert got.shape[-1] == 100
        assert torch.allclose(got, theirs(input_ids=ids).logits, atol=1e-5)
        assert torch.allclose(got, model(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize(
    ("method", "settings"),
    [
        ("IA3Config", {}),
        ("PromptTuningConfig", {"num_virtual_tokens": 4}),
        ("PrefixTuningConfig", {"num_virtual_tokens": 4}),
    ],
)
def test_state_dict_functions_match_peft_for_other_methods(method: str, settings: dict[str, Any]) -> None:
    kw = {**settings, "task_type": "CAUSAL_LM"}
    ours = dt.get_peft_model(tiny_llama(), getattr(dt, method)(**kw))
    theirs = peft.get_peft_model(tiny_llama(), getattr(peft, method)(**kw))
    with torch.no_grad():  # values of their own, so that loading them shows
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    values = peft.get_peft_model_state_dict(theirs)
    mine = dt.get_peft_model_state_dict(ours)
    assert list(mine) == list(values) and all(mine[k].shape == values[k].shape for k in mine)
    result = dt.set_peft_model_state_dict(ours, values)
    want = peft.set_peft_model_state_dict(theirs, values)
    # PEFT's result for prompt methods lists "prompt_embeddings" as unexpected although it loads it, and
    # "word_embeddings.weight", its wrapper's alias of the base embeddings, which deltatune's lacks
    assert result.unexpected_keys == [] and set(result.missing_keys) <= set(want.missing_keys)
    assert set(want.missing_keys) - set(result.missing_keys) <= {"word_embeddings.weight"}
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-5)
