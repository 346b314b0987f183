"""TRL's trainers with deltatune models: SFTTrainer saves the adapter folder (it reloads in
deltatune and in PEFT with the trained outputs); DPOTrainer takes the disabled adapter as its
reference model instead of loading a second base model; both take a deltatune config as
``peft_config=``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

import deltatune
from deltatune import LoraConfig, PeftModel, get_peft_model, integrations
from helpers import tiny_llama

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, **{f"w{i}": i for i in range(1, 96)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="w1")


def _words(i: int, n: int) -> str:
    return " ".join(f"w{(i * 7 + j) % 90 + 2}" for j in range(n))


def _common(out: Path) -> dict[str, Any]:
    return {
        "output_dir": str(out), "max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
        "report_to": [], "use_cpu": True, "bf16": False, "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True,
    }  # fmt: skip


def test_sft_trainer_trains_and_saves_the_adapter(tmp_path: Path) -> None:
    data = datasets.Dataset.from_dict({"text": [_words(i, 10) for i in range(16)]})
    model = get_peft_model(tiny_llama(), LoraConfig(**LORA))
    before = {k: v.detach().clone() for k, v in model.get_adapter_state_dict().items()}
    trainer = trl.SFTTrainer(
        model=model, args=trl.SFTConfig(**_common(tmp_path / "run")), train_dataset=data,
        processing_class=_tokenizer(),
    )  # fmt: skip
    trainer.train()
    after = model.get_adapter_state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in before)
    trainer.save_model(str(tmp_path / "out"))
    names = set(os.listdir(tmp_path / "out"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names and "model.safetensors" not in names
    ids = torch.randint(2, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        ours = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out")).eval()
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out")).eval()
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_sft_trainer_builds_a_deltatune_model_from_a_deltatune_config(tmp_path: Path) -> None:
    """``SFTTrainer(model=<plain model>, peft_config=deltatune.LoraConfig(...))``: TRL calls
    get_peft_model, which the bridge hands to deltatune; the result mirrors peft_config=peft.LoraConfig."""
    data = datasets.Dataset.from_dict({"text": [_words(i, 10) for i in range(16)]})
    trainers = []
    for lib in (deltatune, peft):
        trainers.append(
            trl.SFTTrainer(
                model=tiny_llama(),
                args=trl.SFTConfig(**_common(tmp_path / lib.__name__)),
                train_dataset=data,
                processing_class=_tokenizer(),
                peft_config=lib.LoraConfig(**LORA),
            )  # fmt: skip
        )
    ours, theirs = (t.model for t in trainers)
    assert type(ours) is deltatune.PeftModelForCausalLM and type(theirs).__name__ == "PeftModelForCausalLM"
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert list(deltatune.get_peft_model_state_dict(ours)) == list(peft.get_peft_model_state_dict(theirs))
    trainers[0].train()
    trainers[0].save_model(str(tmp_path / "out"))
    ids = torch.randint(2, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out")).eval()
    with torch.no_grad():
        expected = ours.eval()(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        with ours.disable_adapter():
            assert not torch.allclose(ours(input_ids=ids).logits, expected, atol=1e-4)  # it trained


def test_dpo_trainer_takes_a_deltatune_config(tmp_path: Path) -> None:
    trainer = trl.DPOTrainer(
        model=tiny_llama(), args=trl.DPOConfig(**_common(tmp_path)), train_dataset=_pairs(),
        processing_class=_tokenizer(), peft_config=deltatune.LoraConfig(**LORA),
    )  # fmt: skip
    assert isinstance(trainer.model, deltatune.PeftModel) and trainer.ref_model is None
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rewards/margins" in h]
    assert logs[0]["rewards/chosen"] == 0.0 and logs[-1]["rewards/chosen"] != 0.0


def test_kto_trainer_takes_a_deltatune_config(tmp_path: Path) -> None:
    data = datasets.Dataset.from_dict(
        {
            "prompt": [_words(i, 5) for i in range(8)],
            "completion": [_words(i + 1, 4) for i in range(8)],
            "label": [i % 2 == 0 for i in range(8)],
        }
    )
    trainer = trl.KTOTrainer(
        model=tiny_llama(), args=trl.KTOConfig(**_common(tmp_path)), train_dataset=data,
        processing_class=_tokenizer(), peft_config=deltatune.LoraConfig(**LORA),
    )  # fmt: skip
    assert isinstance(trainer.model, deltatune.PeftModel) and trainer.ref_model is None
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rewards/chosen" in h]
    assert logs[0]["rewards/chosen"] == 0.0 and logs[-1]["rewards/chosen"] != 0.0  # reference: adapter off


def test_without_the_bridge_trl_refuses_a_deltatune_config() -> None:
    data = datasets.Dataset.from_dict({"text": [_words(i, 10) for i in range(4)]})
    config = deltatune.LoraConfig(**LORA)
    integrations.disable()
    try:
        with pytest.raises(TypeError, match="peft.PeftConfig"):
            trl.SFTTrainer(
                model=tiny_llama(), args=trl.SFTConfig(**_common(Path("/tmp/unused-sft"))), train_dataset=data,
                processing_class=_tokenizer(), peft_config=config,
            )  # fmt: skip
    finally:
        integrations.enable()


def _pairs() -> Any:
    return datasets.Dataset.from_dict(
        {
            "prompt": [_words(i, 5) for i in range(8)],
            "chosen": [_words(i + 1, 4) for i in range(8)],
            "rejected": [_words(i + 2, 4) for i in range(8)],
        }
    )


def test_dpo_trainer_uses_the_disabled_adapter_as_reference(tmp_path: Path) -> None:
    data = datasets.Dataset.from_dict(
        {
            "prompt": [_words(i, 5) for i in range(8)],
            "chosen": [_words(i + 1, 4) for i in range(8)],
            "rejected": [_words(i + 2, 4) for i in range(8)],
        }
    )
    model = get_peft_model(tiny_llama(), LoraConfig(**LORA))
    assert integrations.is_enabled()
    trainer = trl.DPOTrainer(
        model=model,
        args=trl.DPOConfig(**_common(tmp_path)),
        train_dataset=data,
        processing_class=_tokenizer(),
    )
    assert trainer.ref_model is None  # no second copy of the base model
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rewards/margins" in h]
    assert len(logs) == 3
    assert logs[0]["rewards/chosen"] == 0.0  # step 1: adapter B is zero, policy == reference
    assert logs[-1]["rewards/chosen"] != 0.0  # later: the trained adapter differs from the disabled one
