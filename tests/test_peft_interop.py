"""LoRA files written by deltatune load in Hugging Face PEFT and vice versa, with equal outputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.io import WEIGHTS_NAME
from helpers import MODELS, model_output, peft_classifier_adapter, randomize_lora, tiny_bert, tiny_llama

peft = pytest.importorskip("peft")

CASES: dict[str, dict[str, object]] = {
    "plain": {},
    "rslora": {"use_rslora": True, "lora_alpha": 16},
    "patterns": {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 3}},
}


def out(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model_output(model(**inputs))


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_variants_both_ways(case: str, tmp_path: Path) -> None:
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "embed_tokens"], **CASES[case]}
    inputs = MODELS["llama"][2]()
    ours = dt.get_peft_model(tiny_llama(), dt.LoraConfig(**kwargs))  # type: ignore[arg-type]
    randomize_lora(ours)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours"))
    torch.testing.assert_close(out(theirs, inputs), out(ours, inputs), atol=1e-5, rtol=0)
    # Same files when PEFT saves them again: same keys, same tensors.
    theirs.save_pretrained(str(tmp_path / "theirs"))
    a, b = (
        load_file(str(tmp_path / "ours" / WEIGHTS_NAME)),
        load_file(str(tmp_path / "theirs" / WEIGHTS_NAME)),
    )
    # PEFT also stores the full base embedding table when embeddings are targeted; we don't.
    assert sorted(a) == sorted(k for k in b if ".base_layer." not in k)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    back = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs")
    torch.testing.assert_close(out(back, inputs), out(ours, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", ["seq_cls", "token_cls", "qa"])
def test_classification_heads_saved_and_read_by_peft(task: str, tmp_path: Path) -> None:
    task_type = {
        "seq_cls": dt.TaskType.SEQ_CLS,
        "token_cls": dt.TaskType.TOKEN_CLS,
        "qa": dt.TaskType.QUESTION_ANS,
    }[task]
    inputs = MODELS["bert"][2]()
    ours = dt.get_peft_model(
        tiny_bert(task), dt.LoraConfig(task_type=task_type, r=4, target_modules=["query", "value"])
    )
    randomize_lora(ours)
    head = next(
        p for n, p in ours.named_parameters() if ".modules_to_save.default." in n and n.endswith("weight")
    )
    assert head.requires_grad
    with torch.no_grad():
        head.add_(0.5)  # a trained head differs from the base model's random one
    ours.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / WEIGHTS_NAME))
    head_name = {"seq_cls": "classifier", "token_cls": "classifier", "qa": "qa_outputs"}[task]
    assert f"base_model.model.{head_name}.weight" in keys
    theirs = peft.PeftModel.from_pretrained(tiny_bert(task), str(tmp_path))
    torch.testing.assert_close(out(theirs, inputs), out(ours, inputs), atol=1e-5, rtol=0)
    back = dt.PeftModel.from_pretrained(tiny_bert(task), tmp_path)
    torch.testing.assert_close(out(back, inputs), out(ours, inputs), atol=1e-5, rtol=0)


def test_peft_classifier_adapter_loads_here(tmp_path: Path) -> None:
    inputs = MODELS["bert"][2]()
    theirs = peft_classifier_adapter(str(tmp_path))
    ours = dt.PeftModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(out(ours, inputs), out(theirs, inputs), atol=1e-5, rtol=0)


def test_parameter_report_matches_peft() -> None:
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    make: Callable[[], nn.Module] = tiny_llama
    ours = dt.get_peft_model(make(), dt.LoraConfig(r=8, target_modules=targets))
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=8, target_modules=targets))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours = dt.get_peft_model(tiny_bert(), dt.LoraConfig(task_type="SEQ_CLS", r=8))
    theirs = peft.get_peft_model(tiny_bert(), peft.LoraConfig(task_type="SEQ_CLS", r=8))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
