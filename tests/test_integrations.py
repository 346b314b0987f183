"""deltatune models in transformers' Trainer and on the Hub, as PEFT models are: PEFT's object
layout, adapter-only saving (save_model, checkpoints, resume, push_to_hub) and the
save_pretrained keywords transformers and accelerate pass."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from deltatune import LoraConfig, PeftModel, get_peft_model, integrations
from helpers import tiny_llama as tiny_lm

peft = pytest.importorskip("peft")

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}


def _batch(seed: int = 0, n: int = 4, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 96, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 32) -> None:
        self.ids = _batch(1, n)["input_ids"]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _trainer(model: Any, out: Path, steps: int, save_steps: int | None = None) -> Any:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-2,
        report_to=[], save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0, data_seed=0,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=_Rows())


def _lora_tensors(model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.get_adapter_state_dict().items()}


# -- PEFT's object layout ---------------------------------------------------------------------
def test_layout_matches_peft() -> None:
    base = tiny_lm()
    ours = get_peft_model(base, LoraConfig(**LORA))
    theirs = peft.get_peft_model(tiny_lm(), peft.LoraConfig(**LORA))
    assert ours.base_model.model is base is ours.get_base_model()
    assert ours.base_model.peft_config is ours.peft_config
    assert ours.base_model.active_adapters == theirs.base_model.active_adapters == ["default"]
    assert ours.active_adapters == theirs.active_adapters == ["default"]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    # The tuner passes attribute reads to the transformers model, as PEFT's does.
    assert ours.base_model.config is base.config
    assert ours.base_model.get_input_embeddings() is base.get_input_embeddings()
    # ... and adapter calls to the wrapper.
    x = _batch()
    with torch.no_grad():
        on = ours(**x).logits
        ours.base_model.disable_adapter_layers()
        off = ours(**x).logits
        ours.base_model.enable_adapter_layers()
    assert torch.equal(on, off)  # B starts at zero
    ours.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.data.fill_(0.5)
    with torch.no_grad():
        changed = ours(**x).logits
        with ours.disable_adapter():
            assert torch.equal(ours(**x).logits, off)
    assert not torch.equal(on, changed)


def test_prompt_learning_base_model_is_the_transformers_model() -> None:
    from deltatune import PromptTuningConfig

    base = tiny_lm()
    ours = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    theirs = peft.get_peft_model(
        tiny_lm(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    )
    assert ours.base_model is base
    assert type(theirs.base_model) is type(base)


# -- the class check, switched on by wrapping a model -------------------------------------------
def test_peft_class_check_accepts_deltatune_models() -> None:
    from accelerate.utils import is_peft_model
    from transformers.trainer_utils import _is_peft_model

    model = get_peft_model(tiny_lm(), LoraConfig(**LORA))
    assert integrations.is_enabled()
    assert isinstance(model, peft.PeftModel) and _is_peft_model(model) and is_peft_model(model)
    assert not isinstance(tiny_lm(), peft.PeftModel) and not is_peft_model(tiny_lm())
    theirs = peft.get_peft_model(tiny_lm(), peft.LoraConfig(**LORA))
    assert isinstance(theirs, peft.PeftModel) and _is_peft_model(theirs)
    integrations.disable()
    try:
        assert not isinstance(model, peft.PeftModel) and not _is_peft_model(model)
        assert isinstance(theirs, peft.PeftModel)
        assert peft.PeftModel is peft.peft_model.PeftModel  # PEFT's own class again
    finally:
        integrations.enable()
    assert isinstance(model, peft.PeftModel)


def test_bridge_set_up_before_peft_is_imported_survives_a_lookup_of_peft() -> None:
    """A deltatune config made before ``peft`` is imported, then ``is_peft_available()``-style lookups
    (``importlib.util.find_spec``), then the import: the import is still patched."""
    import subprocess
    import sys

    script = (
        "import importlib.util, sys\n"
        "import deltatune\n"
        "assert deltatune.integrations._state == {'enabled': False, 'hook': None}  # import alone: nothing\n"
        "deltatune.LoraConfig(r=4)\n"
        "assert 'peft' not in sys.modules\n"
        "assert importlib.util.find_spec('peft') is not None\n"
        "from trl import SFTTrainer\n"
        "import peft, trl.trainer.sft_trainer as sft\n"
        "assert deltatune.integrations.is_enabled()\n"
        "assert isinstance(deltatune.LoraConfig(r=4), sft.PeftConfig)\n"
        "print('ok')\n"
    )
    pytest.importorskip("trl")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# -- Trainer: save_model, checkpoints, resume ---------------------------------------------------
def _reload_logits(folder: Path, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    ours = PeftModel.from_pretrained(tiny_lm(), str(folder)).eval()
    integrations.disable()  # load with PEFT's own class check
    try:
        theirs = peft.PeftModel.from_pretrained(tiny_lm(), str(folder)).eval()
    finally:
        integrations.enable()
    with torch.no_grad():
        return ours(**x).logits, theirs(**x).logits


def test_trainer_saves_and_checkpoints_the_adapter_only(tmp_path: Path) -> None:
    model = get_peft_model(tiny_lm(), LoraConfig(**LORA))
    trainer = _trainer(model, tmp_path / "run", steps=4, save_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    x = _batch(3)
    with torch.no_grad():
        expected = model.eval()(**x).logits
    for folder in (tmp_path / "final", tmp_path / "run" / "checkpoint-4"):
        names = set(os.listdir(folder))
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names
        assert "model.safetensors" not in names
        saved = load_file(str(folder / "adapter_model.safetensors"))
        assert len(saved) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
        assert all(k.startswith("base_model.model.model.layers.") for k in saved)
        ours, theirs = _reload_logits(folder, x)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "final" / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.mark.slow
def test_trainer_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = get_peft_model(tiny_lm(), LoraConfig(**LORA))
    _trainer(straight, tmp_path / "a", steps=4, save_steps=2).train()
    resumed = get_peft_model(tiny_lm(), LoraConfig(**LORA))
    _trainer(resumed, tmp_path / "b", steps=4, save_steps=2).train(
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2")
    )
    want, got = _lora_tensors(straight), _lora_tensors(resumed)
    assert set(want) == set(got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)
    halfway = load_file(str(tmp_path / "a" / "checkpoint-2" / "adapter_model.safetensors"))
    assert any(not torch.allclose(halfway[k], want[k]) for k in want)  # the resumed run did train on


# -- save_pretrained keywords -------------------------------------------------------------------
def test_save_pretrained_takes_transformers_and_accelerate_keywords(tmp_path: Path) -> None:
    from accelerate import Accelerator

    model = get_peft_model(tiny_lm(), LoraConfig(**LORA))
    for p in model.get_adapter_state_dict().values():
        p.data.normal_()
    accelerator = Accelerator(cpu=True)
    model.save_pretrained(
        tmp_path / "a", save_function=accelerator.save, max_shard_size="1MB", safe_serialization=True
    )
    plain = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert plain.keys() == model.get_adapter_state_dict().keys()
    # state_dict=: the adapter's values come from the given full state dict (e.g. one gathered by FSDP).
    full = {k: v + 1.0 for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "b", state_dict=full)
    shifted = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    for k, v in plain.items():
        torch.testing.assert_close(shifted[k], v + 1.0)
    with pytest.raises(ValueError, match="lacks the adapter's tensors"):
        model.save_pretrained(tmp_path / "c", state_dict={"x": torch.zeros(1)})
    with pytest.raises(TypeError, match="unexpected keyword"):
        model.save_pretrained(tmp_path / "d", max_shard_szie="1MB")


# -- push_to_hub, Hub client mocked -------------------------------------------------------------
class _FakeHub:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.repo: str | None = None

    def create_repo(self, repo_id: str, **kwargs: Any) -> Any:
        self.repo = repo_id
        return type("Repo", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id: str, operations: list[Any], **kwargs: Any) -> str:
        for op in operations:
            with open(op.path_or_fileobj, "rb") as f:
                self.files[op.path_in_repo] = f.read()
        return "commit"


def test_push_to_hub_uploads_the_adapter_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import transformers.utils.hub as hub
    from huggingface_hub import ModelCard, ModelCardData

    fake = _FakeHub()
    monkeypatch.setattr(hub, "hf_api", lambda: fake)
    monkeypatch.setattr(
        hub,
        "create_and_tag_model_card",
        lambda repo_id, tags=None, token=None: ModelCard.from_template(ModelCardData(library_name="peft")),
    )
    model = get_peft_model(tiny_lm(), LoraConfig(**LORA))
    model.push_to_hub("me/tiny-lora")
    assert fake.repo == "me/tiny-lora"
    assert set(fake.files) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    (tmp_path / "adapter_model.safetensors").write_bytes(fake.files["adapter_model.safetensors"])
    (tmp_path / "adapter_config.json").write_bytes(fake.files["adapter_config.json"])
    x = _batch(5)
    ours, theirs = _reload_logits(tmp_path, x)
    with torch.no_grad():
        expected = model.eval()(**x).logits
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=1e-5)
