"""The adapter bank: a mixed batch through stacked adapters equals each adapter run alone."""

from __future__ import annotations

import pytest
import torch

from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.methods.lora import fast
from deltatune.methods.lora.bank import SEGMENT_TOKENS, SlotTable
from deltatune.serve import AdapterBank
from helpers import randomize_lora, tiny_llama

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name: (rank, alpha, targets, rsLoRA)
ADAPTERS = {
    "a": (4, 8, ALL, False),
    "b": (2, 3, ["q_proj", "v_proj"], False),
    "c": (8, 4, ["o_proj", "down_proj", "up_proj"], True),
    "d": (1, 1, ["k_proj", "gate_proj"], False),
}


def served_model() -> PeftModel:
    names = list(ADAPTERS)
    model: PeftModel | None = None
    for name in names:
        r, alpha, targets, rs = ADAPTERS[name]
        cfg = LoraConfig(
            r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rs, init_lora_weights=False
        )
        if model is None:
            model = get_peft_model(tiny_llama(), cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    assert model is not None
    randomize_lora(model, std=0.3)
    return model.eval()


def alone(model: PeftModel, ids: torch.Tensor, rows: list[str]) -> torch.Tensor:
    """Logits of each row run by itself with its own adapter (the oracle: no bank involved)."""
    outs = []
    for i, name in enumerate(rows):
        if name == "__base__":
            with model.disable_adapter():
                outs.append(model(input_ids=ids[i : i + 1]).logits)
        else:
            model.set_adapter(name)
            outs.append(model(input_ids=ids[i : i + 1]).logits)
    return torch.cat(outs)


@pytest.mark.parametrize(
    "rows",
    [
        ["a", "b", "c", "d", "__base__", "a"],
        ["c", "c", "c", "c", "c", "b"],  # one large group is split into several segments
        ["__base__", "__base__", "d"],
        ["b"] * 5,
    ],
)
@pytest.mark.parametrize("tokens", [1, 7, SEGMENT_TOKENS])  # per-token bags; per-row bmm
def test_bank_rows_equal_each_adapter_alone(rows: list[str], tokens: int) -> None:
    model = served_model()
    ids = torch.randint(1, 96, (len(rows), tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = alone(model, ids, rows)
        bank = AdapterBank(model, capacity=6, max_rank=8)
        for name in ADAPTERS:
            bank.add_from_model(name)
        banked = model(input_ids=ids, adapter_names=rows).logits
        with bank.rows(rows):
            direct = model.base_model(input_ids=ids).logits
    torch.testing.assert_close(banked, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(direct, expected, atol=1e-5, rtol=0)
    base_rows = [i for i, n in enumerate(rows) if n == "__base__"]
    adapter_rows = [i for i, n in enumerate(rows) if n != "__base__"]
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
    if adapter_rows:  # the adapters really change the output (the comparison above is not vacuous)
        assert (expected[adapter_rows] - base[adapter_rows]).abs().max() > 1e-2
    for i in base_rows:
        torch.testing.assert_close(banked[i], base[i], atol=1e-6, rtol=0)


def test_bank_path_is_the_one_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a bank attached, the per-adapter loop never runs."""
    model = served_model()
    bank = AdapterBank(model, capacity=4)
    for name in ADAPTERS:
        bank.add_from_model(name)
    calls = []
    monkeypatch.setattr(type(next(iter(bank.layers.values()))), "lora_delta", lambda *a: calls.append(a))
    with torch.no_grad():
        model(input_ids=torch.ones(2, 3, dtype=torch.long), adapter_names=["a", "d"])
    assert calls == []


def test_generate_greedy_mixed_equals_alone() -> None:
    model = served_model()
    bank = AdapterBank(model, capacity=4)
    for name in ADAPTERS:
        bank.add_from_model(name)
    ids = torch.randint(1, 96, (3, 5), generator=torch.Generator().manual_seed(2))
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    rows = ["c", "__base__", "a"]
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=rows, **kw)
        bank.detach()
        for i, name in enumerate(rows):
            if name == "__base__":
                with model.disable_adapter():
                    ref = model.generate(input_ids=ids[i : i + 1], **kw)
            else:
                model.set_adapter(name)
                ref = model.generate(input_ids=ids[i : i + 1], **kw)
            assert torch.equal(mixed[i], ref[0]), name


def test_bank_add_replace_remove_and_errors() -> None:
    model = served_model()
    bank = AdapterBank(model, capacity=2, max_rank=4)
    ids = torch.randint(1, 96, (1, 4), generator=torch.Generator().manual_seed(3))
    assert bank.add_from_model("a") == 1
    assert bank.add_from_model("b") == 2
    with pytest.raises(RuntimeError, match="full"):
        bank.add_from_model("d")
    bank.remove("b")
    with pytest.raises(ValueError, match="rank 8 exceeds the bank's rank 4"):
        bank.add_from_model("c")
    assert bank.names == ["a"]  # the failed write left no trace
    # Replacing "a" by "b"'s weights under the name "a": rows of "a" now give b's output.
    b_factors = {p: (*m.factors("b"), m.scaling["b"]) for p, m in bank.layers.items() if "b" in m.lora_A}
    bank.add("a", b_factors)
    model.set_adapter("b")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with bank.rows(["a"]):
            got = model.base_model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    with torch.no_grad(), pytest.raises(KeyError, match="not in the bank"), bank.rows(["zzz"]):
        pass
    with pytest.raises(ValueError, match="another base"):
        bank.add("bad", {"model.layers.0.self_attn.q_proj": (torch.zeros(2, 5), torch.zeros(32, 2), 1.0)})
    with pytest.raises(ValueError, match="no LoRA layer on"):
        bank.add("bad", {"model.layers.0.nope": (torch.zeros(2, 32), torch.zeros(32, 2), 1.0)})
    with pytest.raises(ValueError, match="already has an adapter bank"):
        AdapterBank(model, capacity=1)
    assert bank.nbytes > 0


@pytest.mark.parametrize("bias", [False, True])
def test_dora_slots_equal_each_adapter_alone(bias: bool) -> None:
    """DoRA's eval-time factors per slot are exact; LoRA, DoRA and base rows share one batch."""
    base = tiny_llama(attention_bias=bias, mlp_bias=bias)
    cfg = LoraConfig(
        r=4, target_modules=["q_proj", "o_proj", "up_proj"], use_dora=True, init_lora_weights=False
    )
    model = get_peft_model(base, cfg, adapter_name="dora")
    model.add_adapter(
        "lora", LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    )
    randomize_lora(model, std=0.3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.5)  # a trained magnitude, not the initial row norm
    model.eval()
    rows = ["dora", "__base__", "lora", "dora"]
    ids = torch.randint(1, 96, (4, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = alone(model, ids, rows)
        bank = AdapterBank(model, capacity=2)
        bank.add_from_model("dora")
        bank.add_from_model("lora")
        got = model(input_ids=ids, adapter_names=rows).logits
        base_out = alone(model, ids, ["__base__"] * 4)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (expected[0] - base_out[0]).abs().max() > 1e-2
    bank.remove("dora")  # its rescale is gone with it: the slot is plain zero again
    assert bank.table.rescale_slots == set()


def test_bank_refuses_grad_mode() -> None:
    model = served_model()
    bank = AdapterBank(model, capacity=4)
    bank.add_from_model("a")
    with pytest.raises(RuntimeError, match="no_grad"), bank.rows(["a"]):
        pass


def test_plan_is_built_once_per_forward() -> None:
    table = SlotTable(4)
    table.slots.update({"x": 1, "y": 2})
    groups = [("x", torch.arange(0, 9)), ("y", torch.tensor([9]))]
    plan = table.plan(groups)
    assert plan is not None
    assert plan.slots.tolist() == [1] * 9 + [2] and plan.rows.tolist() == list(range(10))
    assert plan is table.plan(groups)  # built once per forward, reused by every layer
    assert table.plan([("zzz", torch.tensor([0]))]) is None  # unknown name: the loop path


def test_fast_paths_off_still_match() -> None:
    model = served_model()
    rows = ["a", "c", "__base__"]
    ids = torch.randint(1, 96, (3, 4), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        looped = model(input_ids=ids, adapter_names=rows).logits
        bank = AdapterBank(model, capacity=4)
        for name in ADAPTERS:
            bank.add_from_model(name)
        banked = model(input_ids=ids, adapter_names=rows).logits
    assert fast.ENABLED
    torch.testing.assert_close(banked, looped, atol=1e-5, rtol=0)
