"""accelerate with a deltatune model: ``Accelerator.prepare`` + ``save_state`` / ``load_state``
restore the adapter and the optimizer, also into a fresh process's model (as with PEFT)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import deltatune as dt
from helpers import tiny_llama

accelerate = pytest.importorskip("accelerate")

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
IDS = torch.randint(1, 96, (4, 10), generator=torch.Generator().manual_seed(0))


def _setup() -> tuple[Any, Any, Any]:
    accelerator = accelerate.Accelerator(cpu=True)
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(**LORA))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def _steps(accelerator: Any, model: Any, optimizer: Any, n: int) -> None:
    model.train()
    for _ in range(n):
        loss = model(input_ids=IDS, labels=IDS).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()


def _adapter(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in dt.get_peft_model_state_dict(model).items()}


def _moments(optimizer: Any) -> list[torch.Tensor]:
    return [s[k].clone() for s in optimizer.state_dict()["state"].values() for k in ("exp_avg", "exp_avg_sq")]


def test_save_state_and_load_state_restore_adapter_and_optimizer(tmp_path: Path) -> None:
    accelerator, model, optimizer = _setup()
    _steps(accelerator, model, optimizer, 2)
    accelerator.save_state(str(tmp_path / "state"))
    adapter, moments = _adapter(model), _moments(optimizer)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # it trained
    _steps(accelerator, model, optimizer, 2)  # move on, then go back
    assert not all(torch.equal(a, b) for a, b in zip(_adapter(model).values(), adapter.values()))
    accelerator.load_state(str(tmp_path / "state"))
    assert all(torch.equal(a, b) for a, b in zip(_adapter(model).values(), adapter.values()))
    assert all(torch.equal(a, b) for a, b in zip(_moments(optimizer), moments))

    # A fresh run (new base, new wrapper) resumes to the same place and continues identically.
    accelerator2, fresh, optimizer2 = _setup()
    accelerator2.load_state(str(tmp_path / "state"))
    assert all(torch.equal(a, b) for a, b in zip(_adapter(fresh).values(), adapter.values()))
    _steps(accelerator, model, optimizer, 1)
    _steps(accelerator2, fresh, optimizer2, 1)
    assert all(torch.allclose(a, b) for a, b in zip(_adapter(fresh).values(), _adapter(model).values()))


def test_unwrapped_model_saves_the_adapter_folder(tmp_path: Path) -> None:
    accelerator, model, optimizer = _setup()
    _steps(accelerator, model, optimizer, 1)
    accelerator.unwrap_model(model).save_pretrained(
        tmp_path / "adapter", save_function=accelerator.save, state_dict=accelerator.get_state_dict(model)
    )
    reloaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert all(torch.equal(a, b) for a, b in zip(_adapter(reloaded).values(), _adapter(model).values()))
