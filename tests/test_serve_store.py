"""The adapter store: folders load on first use, LRU slots, hot add/replace/remove, refusals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.serve import AdapterNotFound, AdapterRefused, AdapterStore, serving_model
from helpers import randomize_lora, tiny_llama

SPECS = {
    "sql": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "poem": dict(r=8, lora_alpha=4, target_modules=["o_proj", "down_proj"], use_rslora=True),
    "chat": dict(r=2, lora_alpha=2, target_modules="all-linear"),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], use_dora=True),
}


def save_adapter(folder: Path, seed: int, base_kw: dict[str, object] | None = None, **cfg: object) -> None:
    model = get_peft_model(tiny_llama(**(base_kw or {})), LoraConfig(init_lora_weights=False, **cfg))  # type: ignore[arg-type]
    randomize_lora(model, std=0.3, seed=seed)
    model.save_pretrained(str(folder))


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    for i, (name, cfg) in enumerate(SPECS.items()):
        save_adapter(root / name, seed=i, **cfg)
    return root


def reference(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return PeftModel.from_pretrained(tiny_llama(), str(folder)).eval()(input_ids=ids).logits


def test_store_serves_each_adapter_as_loaded_alone(store_dir: Path) -> None:
    store = AdapterStore(serving_model(tiny_llama()), store_dir, capacity=2, max_rank=8)
    assert store.available() == ["chat", "dora", "poem", "sql"] and store.loaded == []
    rows = ["sql", "__base__", "poem", "sql"]
    ids = torch.randint(1, 96, (4, 5), generator=torch.Generator().manual_seed(0))
    store.ensure(rows[:1] + rows[2:])
    with torch.no_grad(), store.bank.rows(rows):
        got = store.bank.model(input_ids=ids).logits
    with torch.no_grad():
        base = tiny_llama()(input_ids=ids).logits
    for i, name in enumerate(rows):
        want = base[i] if name == "__base__" else reference(store_dir / name, ids[i : i + 1])[0]
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)
    assert (got[0] - base[0]).abs().max() > 1e-2
    # LRU: loading a third adapter into two slots evicts the least recently used one.
    store.ensure(["poem"])
    store.ensure(["chat"])
    assert store.loaded == ["poem", "chat"] and store.stats.evictions == 1 and store.stats.loads == 3
    with torch.no_grad(), store.bank.rows(["chat"]):
        got = store.bank.model(input_ids=ids[:1]).logits
    torch.testing.assert_close(got, reference(store_dir / "chat", ids[:1]), atol=1e-5, rtol=0)


def test_dora_adapter_from_files_equals_it_alone(store_dir: Path) -> None:
    store = AdapterStore(serving_model(tiny_llama()), store_dir, capacity=2, max_rank=8)
    ids = torch.randint(1, 96, (3, 5), generator=torch.Generator().manual_seed(6))
    rows = ["dora", "sql", "dora"]
    store.ensure(rows)
    with torch.no_grad(), store.bank.rows(rows):
        got = store.bank.model(input_ids=ids).logits
    for i, name in enumerate(rows):
        torch.testing.assert_close(got[i], reference(store_dir / name, ids[i : i + 1])[0], atol=1e-5, rtol=0)


def test_pinned_adapters_are_not_evicted(store_dir: Path) -> None:
    store = AdapterStore(serving_model(tiny_llama()), store_dir, capacity=1, max_rank=8)
    store.ensure(["sql"])
    store.pin(["sql"], +1)
    with pytest.raises(RuntimeError, match="in use by running requests"):
        store.ensure(["poem"])
    store.pin(["sql"], -1)
    store.ensure(["poem"])
    assert store.loaded == ["poem"]


def test_replace_and_remove_while_serving(store_dir: Path, tmp_path: Path) -> None:
    store = AdapterStore(serving_model(tiny_llama()), store_dir, capacity=2, max_rank=8)
    ids = torch.randint(1, 96, (1, 5), generator=torch.Generator().manual_seed(1))
    store.ensure(["sql"])
    new = tmp_path / "new_sql"
    save_adapter(new, seed=9, r=4, lora_alpha=8, target_modules=["k_proj"])
    store.add("sql", new)  # replaces the resident adapter in place
    with torch.no_grad(), store.bank.rows(["sql"]):
        got = store.bank.model(input_ids=ids).logits
    torch.testing.assert_close(got, reference(new, ids), atol=1e-5, rtol=0)
    assert sorted(os.listdir(store_dir)) == ["chat", "dora", "poem", "sql"]  # no temporary folders left
    store.remove("sql")
    assert store.available() == ["chat", "dora", "poem"] and store.loaded == []
    with pytest.raises(AdapterNotFound):
        store.ensure(["sql"])


def test_adapter_for_another_base_is_refused_naming_both(store_dir: Path, tmp_path: Path) -> None:
    store = AdapterStore(serving_model(tiny_llama()), store_dir, capacity=2, base_name="tiny-llama")
    wide = tmp_path / "wide"
    save_adapter(wide, seed=1, base_kw={"hidden_size": 48}, r=2, target_modules=["q_proj"])
    with pytest.raises(AdapterRefused, match=r"another base") as err:
        store.add("wide", wide)
    assert "tiny-llama" in str(err.value)
    assert "wide" not in store.available()  # refused before any file changed
    cfg_path = store_dir / "sql" / "adapter_config.json"
    cfg_path.write_text(
        cfg_path.read_text()
        .replace('"base_model_name_or_path": null', '"base_model_name_or_path": "other/model"')
        .replace('"base_model_name_or_path": ""', '"base_model_name_or_path": "other/model"')
    )
    with pytest.raises(
        AdapterRefused, match=r"trained for base 'other/model', but this server runs 'tiny-llama'"
    ):
        store.ensure(["sql"])


@pytest.mark.parametrize("name", ["../store", "..", "a/b", "/etc", ".hidden", "", "x" * 200, "a\x00b"])
def test_names_cannot_leave_the_store(store_dir: Path, name: str) -> None:
    store = AdapterStore(serving_model(tiny_llama()), store_dir, capacity=1)
    with pytest.raises(ValueError, match="Invalid adapter name"):
        store.ensure([name])
    assert not store.exists(name)


def test_symlink_out_of_the_store_is_refused(store_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    save_adapter(outside, seed=2, r=2, target_modules=["q_proj"])
    os.symlink(outside, store_dir / "link")
    store = AdapterStore(serving_model(tiny_llama()), store_dir, capacity=1)
    assert "link" not in store.available()
    with pytest.raises(ValueError, match="outside the store"):
        store.ensure(["link"])
