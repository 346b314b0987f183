"""Our wrapped models train with ``transformers.Trainer`` unchanged, and the result saves as an adapter."""

from __future__ import annotations

import pytest
import torch

from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.train.data import Collator, DataSpec, encode
from train_utils import tiny_bert_cls, tokenizer, toy_cls_records


def test_transformers_trainer_trains_a_deltatune_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    tok = tokenizer()
    train, _ = encode(toy_cls_records(32, seed=1), tok, DataSpec(task="seq_cls"))
    model = get_peft_model(
        tiny_bert_cls(),
        LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "key", "value", "dense"]),
    )
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_b = {n: p.clone() for n, p in model.named_parameters() if "lora_B" in n}
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, max_steps=6, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
        remove_unused_columns=False, seed=0,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=train, data_collator=Collator(tok.pad_token_id, "seq_cls")
    )
    out = trainer.train()
    assert out.global_step == 6
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(p, lora_b[n]) for n, p in model.named_parameters() if n in lora_b)
    # Trainer.save_model writes the adapter folder (deltatune models pass transformers' PEFT check).
    trainer.save_model(str(tmp_path / "full"))
    import os

    assert "adapter_model.safetensors" in os.listdir(tmp_path / "full")
    assert "model.safetensors" not in os.listdir(tmp_path / "full")
    model.save_pretrained(str(tmp_path / "saved"))
    reloaded = PeftModel.from_pretrained(tiny_bert_cls(), str(tmp_path / "saved")).eval()
    batch = Collator(tok.pad_token_id, "seq_cls")(train[:4])
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**batch).logits, model.eval()(**batch).logits, atol=1e-5, rtol=1e-5
        )


def test_transformers_trainer_with_gradient_checkpointing(tmp_path):
    from transformers import Trainer, TrainingArguments

    tok = tokenizer()
    train, _ = encode(toy_cls_records(16, seed=1), tok, DataSpec(task="seq_cls"))
    model = get_peft_model(
        tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, max_steps=2, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, remove_unused_columns=False,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True},
    )  # fmt: skip
    before = {n: p.clone() for n, p in model.named_parameters() if "lora_B" in n}
    Trainer(
        model=model, args=args, train_dataset=train, data_collator=Collator(tok.pad_token_id, "seq_cls")
    ).train()
    assert model.get_base_model().is_gradient_checkpointing
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # reentrant checkpointing still reaches every LoRA weight


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_peftmodel_gradient_checkpointing_reaches_lora(use_reentrant):
    tok = tokenizer()
    train, _ = encode(toy_cls_records(8, seed=1), tok, DataSpec(task="seq_cls"))
    model = get_peft_model(
        tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])
    )
    model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
    model.train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    model(**Collator(tok.pad_token_id, "seq_cls")(train)).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_A" in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_trainer_defaults_keep_the_model_inputs_of_a_datasets_dataset(tmp_path):
    """With TrainingArguments' default remove_unused_columns=True, the Trainer keeps the dataset
    columns that inspect.signature(model.forward) names: ours reports the base model's inputs."""
    import inspect

    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    tok = tokenizer()
    rows, _ = encode(toy_cls_records(16, seed=1), tok, DataSpec(task="seq_cls"))
    data = Dataset.from_list([{**r, "note": "unused"} for r in rows])
    model = get_peft_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
    params = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "adapter_names"} <= set(params)
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, max_steps=2, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=Collator(tok.pad_token_id, "seq_cls")
    )
    assert trainer.train().global_step == 2
    batch = next(iter(trainer.get_train_dataloader()))  # the unused column was dropped, the inputs kept
    assert {"input_ids", "attention_mask", "labels"} <= set(batch) and "note" not in batch
