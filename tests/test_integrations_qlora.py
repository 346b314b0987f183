"""The standard QLoRA recipe with deltatune in place of PEFT: a transformers model loaded in 4 bits
by bitsandbytes (``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``),
``deltatune.prepare_model_for_kbit_training``, ``deltatune.get_peft_model(LoraConfig)`` and
``transformers.Trainer``: it trains, saves the adapter only, and PEFT reloads it over the same
4-bit base with identical outputs."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import deltatune as dt

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"], "task_type": "CAUSAL_LM"}
IDS = torch.randint(1, 96, (8, 12), generator=torch.Generator().manual_seed(0))


def _prepared(base: nn.Module, lib: Any) -> Any:
    base = lib.prepare_model_for_kbit_training(base)
    return lib.get_peft_model(base, lib.LoraConfig(**LORA))


@pytest.mark.usefixtures("no_dynamo")
def test_qlora_recipe_trains_saves_the_adapter_and_reloads_in_peft(
    bnb_saved: Callable[[int], nn.Module], tmp_path: Path
) -> None:
    from transformers import Trainer, TrainingArguments

    model = _prepared(bnb_saved(4), dt)
    assert type(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    # the same parameter report and status as PEFT's over the same 4-bit base (4-bit weights at their logical count)
    reference = _prepared(bnb_saved(4), peft)
    assert model.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    ours, theirs = (
        dataclasses.asdict(lib.get_model_status(m)) for lib, m in ((dt, model), (peft, reference))
    )
    assert {k: v for k, v in ours.items() if k != "adapter_model_type"} == {
        k: v for k, v in theirs.items() if k != "adapter_model_type"
    }
    rows = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in IDS]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=8, learning_rate=3e-2,
        report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1, save_strategy="no", seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=rows)  # a purely quantised model would be refused
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.02, losses
    trainer.save_model(str(tmp_path / "adapter"))
    files = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    assert os.path.getsize(tmp_path / "adapter" / "adapter_model.safetensors") < 64 * 1024

    theirs = peft.PeftModel.from_pretrained(bnb_saved(4), tmp_path / "adapter")
    again = dt.PeftModel.from_pretrained(bnb_saved(4), tmp_path / "adapter")
    x = IDS[:2]
    with torch.no_grad():
        mine = model.train()(input_ids=x).logits
        with model.disable_adapter():
            base = model(input_ids=x).logits
        peft_logits = theirs.train()(input_ids=x).logits
        again_logits = again.train()(input_ids=x).logits
    assert torch.allclose(mine, peft_logits, atol=1e-5) and torch.allclose(mine, again_logits, atol=1e-5)
    assert not torch.allclose(mine, base, atol=1e-3)  # the trained adapter changes the outputs
