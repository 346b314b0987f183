"""The public interface: the mission's snippet, task types, parameter report, errors that teach."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from deltatune import LoraConfig, PeftModel, TaskType, get_peft_model
from deltatune.methods.base import ModulesToSaveWrapper
from deltatune.methods.lora import Linear
from helpers import (
    MODELS,
    llama3_8b_meta,
    model_output,
    peft_classifier_adapter,
    randomize_lora,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_mlp,
    tiny_t5,
)

LLAMA3_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_mission_snippet_on_llama3_8b_figures(capsys: pytest.CaptureFixture[str]) -> None:
    model = llama3_8b_meta()
    lora_config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=LLAMA3_TARGETS,
        bias="none",
    )
    model = get_peft_model(model, lora_config)
    model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == (
        "trainable params: 41,943,040 || all params: 8,072,204,288 || trainable%: 0.5196"
    )
    # r=32 gives the mission text's 83,886,080: twice as many, since the count is linear in r.
    model32 = get_peft_model(llama3_8b_meta(), LoraConfig(r=32, target_modules=LLAMA3_TARGETS))
    assert model32.get_nb_trainable_parameters()[0] == 83_886_080


def test_report_format_and_counts() -> None:
    model = get_peft_model(tiny_mlp(), LoraConfig(r=2, target_modules=["lin0"]))
    # lin0: A (2, 10) + B (20, 2) = 60; base: 10*20+20 + 20*20+20 + 20*2+2 = 682
    assert model.get_nb_trainable_parameters() == (60, 742)


def test_default_targets_per_architecture() -> None:
    def targets(model: nn.Module) -> set[str]:
        wrapped = get_peft_model(model, LoraConfig())
        return {n.split(".")[-1] for n, m in wrapped.named_modules() if isinstance(m, Linear)}

    assert targets(tiny_llama()) == {"q_proj", "v_proj"}
    assert targets(tiny_gpt2()) == {"c_attn"}
    assert targets(tiny_bert()) == {"query", "value"}
    assert targets(tiny_t5()) == {"q", "v"}


def test_fallback_for_unlisted_architecture_never_hits_the_head() -> None:
    model = tiny_llama()
    model.config.model_type = "my-new-arch"
    wrapped = get_peft_model(model, LoraConfig())
    names = {n.split(".")[-1] for n, m in wrapped.named_modules() if isinstance(m, Linear)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    mlp = get_peft_model(tiny_mlp(), LoraConfig())
    assert [n for n, m in mlp.named_modules() if isinstance(m, Linear)] == [
        "base_model.model.lin0",
        "base_model.model.lin1",
    ]


def test_get_peft_model_on_meta_device_small() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2))
    wrapped = get_peft_model(model, LoraConfig(r=4))
    a = wrapped.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert a.is_meta and a.shape == (4, 64)


@pytest.mark.parametrize(
    ("factory", "task", "head"),
    [
        (lambda: tiny_bert("seq_cls"), TaskType.SEQ_CLS, "classifier"),
        (lambda: tiny_bert("token_cls"), TaskType.TOKEN_CLS, "classifier"),
        (lambda: tiny_bert("qa"), TaskType.QUESTION_ANS, "qa_outputs"),
        (lambda: tiny_llama("seq_cls"), TaskType.SEQ_CLS, "score"),
    ],
)
def test_task_heads_are_trained_and_saved(factory, task: TaskType, head: str) -> None:  # type: ignore[no-untyped-def]
    model = get_peft_model(
        factory(), LoraConfig(task_type=task, r=2, target_modules=["query", "value", "q_proj"])
    )
    wrapper = model.base_model.get_submodule(head)
    assert isinstance(wrapper, ModulesToSaveWrapper)
    assert all(p.requires_grad for p in wrapper.modules_to_save["default"].parameters())
    assert not any(p.requires_grad for p in wrapper.original_module.parameters())
    state = model.get_adapter_state_dict()
    assert f"base_model.model.{head}.weight" in state
    merged = model.merge_and_unload()
    assert not isinstance(merged.get_submodule(head), ModulesToSaveWrapper)


def test_feature_extraction_and_seq2seq_forward() -> None:
    model = get_peft_model(tiny_bert("feature"), LoraConfig(task_type=TaskType.FEATURE_EXTRACTION, r=2))
    assert model(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state.shape == (1, 3, 32)
    t5 = get_peft_model(tiny_t5(), LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=2))
    inputs = MODELS["t5"][2]()
    labels = inputs.pop("decoder_input_ids")
    loss = t5(**inputs, labels=labels).loss
    loss.backward()
    assert all(p.grad is not None for p in t5.parameters() if p.requires_grad)
    generated = t5.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[0] == 3


def test_attribute_passthrough() -> None:
    model = get_peft_model(tiny_llama(), LoraConfig())
    assert model.config.model_type == "llama"
    assert model.get_input_embeddings() is model.base_model.model.model.embed_tokens


def test_gradient_checkpointing_with_lora() -> None:
    """Checkpointed training (both re-entrant modes) gives the adapter the gradients of a plain run."""
    ids = torch.tensor([[1, 2, 3, 4]])
    model = get_peft_model(tiny_llama(), LoraConfig(r=2))
    randomize_lora(model)  # non-zero B: A gets a gradient too
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}  # type: ignore[union-attr]
    assert len(expected) == 2 * 2 * 2  # A and B of q_proj and v_proj, 2 layers
    assert all(torch.count_nonzero(g) > 0 for g in expected.values())
    for reentrant in (True, False):
        model.zero_grad()
        model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        assert model.base_model.is_gradient_checkpointing
        model(input_ids=ids, labels=ids).loss.backward()
        for name, grad in expected.items():
            torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-5, atol=1e-7)


# -- errors that teach --------------------------------------------------------------------
def test_target_matching_nothing_lists_candidates() -> None:
    with pytest.raises(ValueError, match=r"matched no module.*look close: \['q_proj'\]"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q"]))


def test_unsupported_module_type_is_named() -> None:
    with pytest.raises(ValueError, match="LayerNorm"):
        get_peft_model(tiny_bert(), LoraConfig(target_modules=["LayerNorm"]))


@pytest.mark.parametrize("r", [0, -4])
def test_rank_must_be_positive(r: int) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        LoraConfig(r=r)


def test_duplicate_adapter_name() -> None:
    model = get_peft_model(tiny_llama(), LoraConfig())
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", LoraConfig())


def test_already_wrapped_and_unknown_adapter() -> None:
    model = get_peft_model(tiny_llama(), LoraConfig())
    with pytest.raises(ValueError, match="already wrapped"):
        get_peft_model(model, LoraConfig())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="No adapter named 'x'"):
        model.set_adapter("x")


def test_bad_task_type() -> None:
    with pytest.raises(ValueError, match="task type"):
        LoraConfig(task_type="IMAGE_MAGIC")


def test_model_output_helper_is_not_vacuous() -> None:
    out = tiny_llama()(input_ids=torch.tensor([[1, 2]]))
    assert model_output(out).shape == (1, 2, 96)


def test_cli_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deltatune", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in result.stdout


def test_public_api_is_exported() -> None:
    """``from deltatune import *`` gives the documented API, and get_peft_model returns a PeftModel."""
    import deltatune

    namespace: dict[str, object] = {}
    exec("from deltatune import *", namespace)
    exported = {k for k in namespace if not k.startswith("__")} | {"__version__"}
    assert exported == set(deltatune.__all__)
    for name in ("PeftModel", "get_peft_model", "LoraConfig", "IA3Config", "BottleneckConfig", "PromptTuningConfig",
                 "PrefixTuningConfig", "LoftQConfig", "PeftConfig", "TaskType", "register_method", "registered_methods"):  # fmt: skip
        assert name in exported, name
    model = get_peft_model(tiny_mlp(), LoraConfig(r=2, target_modules=["lin0"]))
    assert type(model) is PeftModel and isinstance(model, nn.Module)
    assert PeftModel.from_pretrained.__doc__ and get_peft_model.__doc__


# -- PEFT parity: switching while merged, unload, the rest of PeftModel's surface ---------
def two_lora_adapters() -> PeftModel:
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("b", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model)
    return model


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model_output(model(**inputs))


def test_set_adapter_on_merged_model_unmerges_first() -> None:
    inputs = MODELS["llama"][2]()
    model = two_lora_adapters()
    base = logits(tiny_llama(), inputs)
    model.set_adapter("b")
    only_b = logits(model, inputs)
    model.set_adapter("default")
    model.merge_adapter()
    with pytest.warns(UserWarning, match="merged into the base weights; unmerging"):
        model.set_adapter("b")
    assert not any(m.merged for m in model.modules() if isinstance(m, Linear))
    torch.testing.assert_close(logits(model, inputs), only_b, atol=1e-5, rtol=0)
    with model.disable_adapter():  # the base weights are back to the original
        torch.testing.assert_close(logits(model, inputs), base, atol=1e-5, rtol=0)


def head_models(tmp_path: Path) -> tuple[nn.Module, PeftModel]:
    """The same SEQ_CLS LoRA adapter with a trained head, in PEFT and (loaded from its file) here."""
    theirs = peft_classifier_adapter(str(tmp_path))
    return theirs, PeftModel.from_pretrained(tiny_bert(), tmp_path)


@pytest.mark.parametrize("how", ["unload", "merge_and_unload"])
def test_unload_keeps_the_trained_head_like_peft(how: str, tmp_path: Path) -> None:
    inputs = MODELS["bert"][2]()
    theirs, ours = head_models(tmp_path)
    trained_head = ours.base_model.classifier.modules_to_save["default"].weight.detach().clone()
    plain_theirs, plain_ours = getattr(theirs, how)(), getattr(ours, how)()
    assert not isinstance(plain_ours.classifier, ModulesToSaveWrapper)
    assert torch.equal(plain_ours.classifier.weight, trained_head)
    assert not torch.equal(plain_ours.classifier.weight, tiny_bert().classifier.weight)
    torch.testing.assert_close(logits(plain_ours, inputs), logits(plain_theirs, inputs), atol=1e-5, rtol=0)


def test_get_base_model_and_peft_type() -> None:
    base = tiny_llama()
    model = get_peft_model(base, LoraConfig(r=2))
    assert model.get_base_model() is base
    assert model.peft_type == "LORA"
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2))
    assert type(theirs.get_base_model()) is type(model.get_base_model())
    assert theirs.peft_type == model.peft_type
    # PEFT's layout: base_model is a tuner whose .model is the transformers model, so parameter
    # names are the same in both (base_model.model.<module path>).
    assert model.base_model.model is base
    assert model.base_model.peft_config is model.peft_config
    assert model.base_model.active_adapters == theirs.base_model.active_adapters == ["default"]
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in theirs.named_parameters()]


def test_enable_and_disable_adapter_layers_like_peft(tmp_path: Path) -> None:
    inputs = MODELS["bert"][2]()
    theirs, _ = head_models(tmp_path)
    ours = PeftModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)
    theirs_t = pytest.importorskip("peft").PeftModel.from_pretrained(
        tiny_bert(), str(tmp_path), is_trainable=True
    )
    adapted = logits(ours, inputs)
    for model in (ours, theirs_t):
        model.disable_adapter_layers()
    assert ours.get_nb_trainable_parameters() == theirs_t.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] == 0
    base = logits(tiny_bert(), inputs)
    for _ in range(2):  # persistent, unlike the disable_adapter() block
        torch.testing.assert_close(logits(ours, inputs), base, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(theirs_t, inputs), base, atol=1e-5, rtol=0)
    for model in (ours, theirs_t):
        model.enable_adapter_layers()
    assert ours.get_nb_trainable_parameters() == theirs_t.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] > 0
    torch.testing.assert_close(logits(ours, inputs), adapted, atol=0, rtol=0)


def test_disable_adapter_layers_warns_about_trained_biases() -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, bias="all"))
    with pytest.warns(UserWarning, match="bias='all'"):
        model.disable_adapter_layers()


def test_set_requires_grad_and_inference_mode_like_peft() -> None:
    peft = pytest.importorskip("peft")
    ours = two_lora_adapters()
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    theirs.add_adapter("b", peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    one = ours.get_nb_trainable_parameters()
    for model in (ours, theirs):
        model.set_requires_grad("b")
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] == 2 * one[0]
    assert all(p.requires_grad for n, p in ours.named_parameters() if ".b." in n)
    for model in (ours, theirs):
        model.set_requires_grad(["default", "b"], requires_grad=False)
    assert ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0] == 0
    for model in (ours, theirs):
        model.set_adapter("b", inference_mode=True)
    assert ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0] == 0
    ours.set_adapter("b")
    assert ours.get_nb_trainable_parameters() == one
    with pytest.raises(ValueError, match=r"Unknown adapters \['c'\]"):
        ours.set_requires_grad("c")


# -- robustness: refusals that change nothing -----------------------------------------------
def test_delete_merged_adapter_refuses_before_changing_anything() -> None:
    inputs = MODELS["llama"][2]()
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens"])
    )
    randomize_lora(model)
    embed = model.base_model.model.model.embed_tokens
    with torch.no_grad():
        embed.modules_to_save["default"].weight.add_(1.0)  # a "trained" embedding copy
    before = logits(model, inputs)
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"'default' is merged.*unmerge_adapter\(\) first"):
        model.delete_adapter("default")
    assert list(model.peft_config) == ["default"]
    assert "default" in embed.modules_to_save and embed.active_adapters == ["default"]
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, inputs), before, atol=1e-5, rtol=0)
    model.delete_adapter("default")  # allowed once unmerged
    assert "default" not in embed.modules_to_save


@pytest.mark.parametrize(
    "name",
    ["/tmp/elsewhere", "a/b", "..\\up", "a\\b", "", "  ", "..", "x:y", "tab\there", " lead", "n" * 201],
)
def test_adapter_names_must_be_single_folder_names(name: str, tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="Adapter name"):
        model.add_adapter(name, LoraConfig(r=2, target_modules=["k_proj"]))
    assert list(model.peft_config) == ["default"]
    assert not any("k_proj.lora" in n for n, _ in model.named_modules())


def test_save_pretrained_stays_inside_save_directory(tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("task-A_2", LoraConfig(r=2, target_modules=["k_proj"]))
    model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "task-A_2" / "adapter_config.json").is_file()
    # A name set behind add_adapter's back is still refused by save_pretrained.
    model.peft_config["../escape"] = model.peft_config.pop("task-A_2")
    with pytest.raises(ValueError, match="Adapter name '../escape'"):
        model.save_pretrained(tmp_path / "out2")
    assert not (tmp_path / "escape").exists()


def test_wrapping_a_base_twice_is_refused_and_changes_nothing() -> None:
    base = tiny_llama()
    first = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    counts = first.get_nb_trainable_parameters()
    for targets in (["k_proj"], ["q_proj"]):
        with pytest.raises(
            ValueError, match=r"already holds deltatune adapter layers.*add_adapter.*unload\(\)"
        ):
            get_peft_model(base, LoraConfig(r=2, target_modules=targets))
        with pytest.raises(ValueError, match="already holds deltatune adapter layers"):
            PeftModel(base, LoraConfig(r=2, target_modules=targets))
    assert first.get_nb_trainable_parameters() == counts
    assert list(first.peft_config) == ["default"]
    assert not any("k_proj.lora" in n for n, _ in first.named_parameters())
    config = LoraConfig(r=2, target_modules=["k_proj"])
    with pytest.raises(ValueError, match="already wrapped"):
        get_peft_model(first, config, revision="main")  # type: ignore[arg-type]
    assert config.revision is None
    # After unload() the plain model can be wrapped again.
    again = get_peft_model(first.unload(), LoraConfig(r=2, target_modules=["k_proj"]))
    assert again.get_nb_trainable_parameters()[0] > 0


def test_wrapping_a_peft_library_model_is_refused() -> None:
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="layers of the peft library.*unload"):
        get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))


def test_failed_wrap_restores_the_base(monkeypatch: pytest.MonkeyPatch) -> None:
    """A method that fails halfway through injection leaves no layer behind, and no flag changed."""
    from deltatune.methods.lora import LoraTuner

    base = tiny_llama()
    base.lm_head.weight.requires_grad_(True)
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    modules = dict(base.named_modules())
    real = LoraTuner.create_layer
    calls = []

    def fail_on_third(self, path, module, config, adapter_name):  # type: ignore[no-untyped-def]
        calls.append(path)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(self, path, module, config, adapter_name)

    monkeypatch.setattr(LoraTuner, "create_layer", fail_on_third)
    with pytest.raises(RuntimeError, match="boom"):
        get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert dict(base.named_modules()) == modules
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    # The same failure in add_adapter of an existing wrapper takes back only the new adapter.
    monkeypatch.setattr(LoraTuner, "create_layer", real)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    wrapped = dict(model.named_modules())
    calls.clear()
    monkeypatch.setattr(LoraTuner, "create_layer", fail_on_third)
    with pytest.raises(RuntimeError, match="boom"):
        model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj"]))
    assert dict(model.named_modules()) == wrapped
    assert list(model.peft_config) == ["default"]
    assert not any(".b." in n for n, _ in model.named_parameters())


def test_merge_unknown_adapter_names_the_known_ones() -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"unknown adapters \['nope'\]; this model has \['default'\]"):
        model.merge_adapter(["nope"])
    assert not any(m.merged for m in model.modules() if isinstance(m, Linear))


def test_save_without_adapters_is_a_clear_error(tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.delete_adapter("default")
    with pytest.raises(ValueError, match="holds no adapter.*nothing to write"):
        model.save_pretrained(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
