"""(IA)³ adapters in the adapter bank: their vectors share the bank (and every batch) with LoRA
adapters, and a mixed batch equals each adapter run alone (PEFT 0.21 as the (IA)³ oracle)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deltatune import IA3Config, LoraConfig, get_peft_model
from deltatune.methods.lora.bank import SEGMENT_TOKENS
from deltatune.serve import AdapterBank, AdapterRefused, AdapterStore, ia3_scales, serving_model
from helpers import randomize_lora, tiny_llama

peft = pytest.importorskip("peft")

IA3_SPECS = {  # the architecture's defaults (k, v out; down_proj in), and a custom target set
    "ia3": {},
    "ia3b": {"target_modules": ["q_proj", "up_proj", "down_proj"], "feedforward_modules": ["up_proj"]},
}


def save_ia3(folder: Path, seed: int, base_kw: dict[str, object], **cfg: object) -> None:
    torch.manual_seed(seed)
    model = get_peft_model(tiny_llama(**base_kw), IA3Config(init_ia3_weights=False, **cfg))  # type: ignore[arg-type]
    model.save_pretrained(str(folder))


def save_lora(folder: Path, base_kw: dict[str, object]) -> None:
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(tiny_llama(**base_kw), cfg)
    randomize_lora(model, std=0.3)
    model.save_pretrained(str(folder))


def alone(folder: Path, ids: torch.Tensor, base_kw: dict[str, object]) -> torch.Tensor:
    """The oracle: PEFT's own model with that one adapter."""
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(tiny_llama(**base_kw), str(folder)).eval()(input_ids=ids).logits


@pytest.fixture(params=[False, True], ids=["no-bias", "bias"])
def base_kw(request: pytest.FixtureRequest) -> dict[str, object]:
    return {"attention_bias": request.param, "mlp_bias": request.param}


@pytest.fixture
def store_dir(tmp_path: Path, base_kw: dict[str, object]) -> Path:
    root = tmp_path / "store"
    for i, (name, cfg) in enumerate(IA3_SPECS.items()):
        save_ia3(root / name, seed=i, base_kw=base_kw, **cfg)
    save_lora(root / "lora", base_kw)
    return root


@pytest.mark.parametrize("tokens", [1, SEGMENT_TOKENS])
def test_ia3_and_lora_rows_equal_each_alone(store_dir: Path, base_kw: dict[str, object], tokens: int) -> None:
    store = AdapterStore(serving_model(tiny_llama(**base_kw)), store_dir, capacity=3, max_rank=4)
    rows = ["ia3", "lora", "__base__", "ia3b", "ia3"]
    ids = torch.randint(1, 96, (len(rows), tokens), generator=torch.Generator().manual_seed(0))
    store.ensure(["ia3", "lora", "ia3b"])
    with torch.no_grad(), store.bank.rows(rows):
        got = store.bank.model(input_ids=ids).logits
    with torch.no_grad():
        base = tiny_llama(**base_kw)(input_ids=ids).logits
    for i, name in enumerate(rows):
        want = base[i] if name == "__base__" else alone(store_dir / name, ids[i : i + 1], base_kw)[0]
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)
        if name != "__base__":  # the vectors really change the output
            assert (want - base[i]).abs().max() > 1e-3, name


def test_ia3_from_a_model_and_slot_reuse(base_kw: dict[str, object]) -> None:
    """ia3_scales() takes an in-memory (IA)³ adapter; removing it leaves a plain slot that a LoRA
    adapter then reuses without any trace of the vectors."""
    torch.manual_seed(7)
    ia3_model = get_peft_model(tiny_llama(**base_kw), IA3Config(init_ia3_weights=False)).eval()
    lora = get_peft_model(
        tiny_llama(**base_kw), LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)
    )
    randomize_lora(lora, std=0.3)
    lora.eval()
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_ia3 = ia3_model(input_ids=ids).logits
        want_lora = lora(input_ids=ids).logits
        bank = AdapterBank(lora, capacity=1)
        assert bank.add("v", ia3_scales(ia3_model, "default")) == 1
        assert bank.table.rescale_slots == {1}
        with bank.rows(["v", "v"]):
            torch.testing.assert_close(lora.base_model(input_ids=ids).logits, want_ia3, atol=1e-5, rtol=0)
        bank.remove("v")
        assert bank.table.rescale_slots == set()
        assert bank.add_from_model("default") == 1  # the same slot, now LoRA
        with bank.rows(["default", "default"]):
            torch.testing.assert_close(lora.base_model(input_ids=ids).logits, want_lora, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no \\(IA\\)³ layers"):
        ia3_scales(lora, "default")


def test_ia3_for_another_base_is_refused(tmp_path: Path) -> None:
    save_ia3(tmp_path / "store" / "wide", seed=0, base_kw={"hidden_size": 48})
    store = AdapterStore(serving_model(tiny_llama()), tmp_path / "store", capacity=1, max_rank=4)
    with pytest.raises(AdapterRefused, match="trained for another base"):
        store.ensure(["wide"])
    assert store.loaded == []
