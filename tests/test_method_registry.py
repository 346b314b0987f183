"""Adding a method is its file plus its export: one ``register_method`` call makes a method that
the wrapper injects, saves and loads and that ``deltatune train`` trains. Duplicates are refused.

The toy method below lives in this test file only: a learned shift δ (out,) added to the
output of each targeted linear layer, y = W x + b + δ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import deltatune.config
from deltatune import LoraConfig, PeftConfig, PeftModel, register_method
from deltatune.cli import main
from deltatune.config import CliRecipe
from deltatune.methods.base import AdapterLayer, Tuner
from deltatune.methods.lora import LoraTuner
from deltatune.targeting import find_targets, is_linear
from deltatune.train.methods import METHODS
from train_utils import save_tiny_cls_model, tiny_bert_cls, toy_cls_records


@dataclass
class ShiftConfig(PeftConfig):
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "TOY_SHIFT"


class ShiftLayer(AdapterLayer):
    adapter_containers: ClassVar[tuple[str, ...]] = ("shift",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: ShiftConfig) -> None:
        super().__init__(base_layer)
        self.shift = nn.ParameterDict()
        self.add_adapter(adapter_name, config)

    def add_adapter(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        out = self.base_layer.weight.shape[0]
        self.shift[adapter_name] = nn.Parameter(torch.zeros(out))
        self.activate(adapter_name)

    def forward_active(self, x: torch.Tensor, names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.base_layer(x) + sum(self.shift[n] for n in names)

    def forward_mixed(self, x: torch.Tensor, row_groups: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x)
        for name, rows in row_groups:
            if name in self.shift:
                y = y.index_add(0, rows, self.shift[name].expand_as(y[rows]))
        return y


class ShiftTuner(Tuner[ShiftConfig]):
    layer_base = ShiftLayer

    def target_paths(self, model: nn.Module, config: ShiftConfig) -> list[str]:
        return find_targets(model, config.target_modules, accept=lambda _, m: is_linear(m), method="shift")

    def create_layer(
        self, path: str, module: nn.Module, config: ShiftConfig, adapter_name: str
    ) -> AdapterLayer:
        return ShiftLayer(module, adapter_name, config)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Methods registered inside a test are forgotten after it."""
    monkeypatch.setattr(deltatune.config, "_REGISTRY", dict(deltatune.config._REGISTRY))


def _register() -> None:
    register_method(
        "TOY_SHIFT",
        ShiftConfig,
        ShiftTuner,
        cli=[CliRecipe("shift", "a learned shift of linear outputs", 5e-2)],
    )


def test_a_method_registered_from_a_test_file_trains_through_the_cli(
    registry: None, tmp_path, capsys
) -> None:
    _register()
    assert "shift" in METHODS and METHODS["shift"].default_lr == 5e-2
    save_tiny_cls_model(str(tmp_path / "model"))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_cls_records(32)))
    code = main([
        "train", "shift", "--model", str(tmp_path / "model"), "--train-file", str(tmp_path / "train.jsonl"),
        "--output-dir", str(tmp_path / "run"), "--max-steps", "4", "--quiet", "--no-plot",
        "--target-modules", "query,value",
    ])  # fmt: skip
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, captured.err
    assert "method shift:" in out and "adapter saved to" in out
    adapter = tmp_path / "run" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["peft_type"] == "TOY_SHIFT" and saved["target_modules"] == ["query", "value"]

    # The saved adapter loads back through the wrapper and changes the model's outputs.
    loaded = PeftModel.from_pretrained(tiny_bert_cls(), adapter)
    shifts = [p for n, p in loaded.named_parameters() if ".shift." in n]
    assert len(shifts) == 4 and all(float(s.abs().sum()) > 0 for s in shifts)  # trained: no longer zero
    ids = torch.tensor([[2, 5, 7, 3]])
    with torch.no_grad():
        adapted = loaded(input_ids=ids).logits
        with loaded.disable_adapter():
            base = loaded(input_ids=ids).logits
    assert not torch.allclose(adapted, base)


def test_a_registered_method_is_refused_a_second_time(registry: None) -> None:
    _register()
    with pytest.raises(ValueError, match="'TOY_SHIFT' is already registered"):
        _register()
    with pytest.raises(ValueError, match="'LORA' is already registered"):
        register_method("LORA", LoraConfig, LoraTuner)
    with pytest.raises(ValueError, match=r"CLI method name\(s\) \['lora'\] are already taken"):
        register_method("OTHER", ShiftConfig, ShiftTuner, cli=[CliRecipe("lora", "clash", 1e-3)])
    assert "OTHER" not in deltatune.registered_methods()


def test_every_builtin_cli_method_comes_from_the_registry() -> None:
    assert list(METHODS) == [
        "lora",
        "dora",
        "qlora",
        "loftq",
        "ia3",
        "bottleneck",
        "prompt",
        "prefix",
        "full",
    ]
    assert {name: METHODS[name].default_lr for name in METHODS} == {
        "lora": 3e-3, "dora": 3e-3, "qlora": 3e-3, "loftq": 1e-3, "ia3": 5e-3, "bottleneck": 1e-3,
        "prompt": 3e-2, "prefix": 1e-2, "full": 5e-5,
    }  # fmt: skip
