"""The contract every registered method keeps, checked for each one automatically.

Each method in ``deltatune.registered_methods()`` runs here with a small example config on the
tiny Llama, GPT-2, BERT (sequence classification) and T5, plus the variants listed in VARIANTS
(a plain torch MLP among them).
A new method is tested by registering it (and, if its config has required fields, adding them
to REQUIRED_SETTINGS). The contract:

- only adapter parameters train: the base model's own tensors stay frozen and bit-for-bit equal;
- save / load round trip: the adapter folder (config, weights, model card) loads onto a fresh base
  with the same outputs;
- disable = base: inside ``disable_adapter()`` the model computes the base model's outputs;
- merge = unmerged (for mergeable methods): merging, unmerging and ``merge_and_unload()`` keep the
  outputs; a method that cannot merge refuses clearly and changes nothing;
- mixed batch = each alone: a batch whose rows use different adapters (or none) gives each row
  what that adapter alone gives;
- greedy ``generate()`` equals step-by-step greedy decoding by full forwards (causal and seq2seq LMs);
- PEFT parity where PEFT has the method: our file loads in PEFT and PEFT's file loads here, with
  the same outputs.

Adapters are made non-trivial by adding noise to every parameter the method added (a fresh LoRA
or bottleneck adapter is an identity, which would hide most bugs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import deltatune as dt
from helpers import (
    greedy_by_forward,
    model_output,
    no_eos,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_mlp,
    tiny_t5,
    token_ids,
)

# Architectures every method runs on: factory, task type.
ARCHS: dict[str, tuple[Callable[[], nn.Module], str | None]] = {
    "llama": (tiny_llama, "CAUSAL_LM"),
    "gpt2": (tiny_gpt2, "CAUSAL_LM"),
    "bert": (tiny_bert, "SEQ_CLS"),
    "t5": (tiny_t5, "SEQ_2_SEQ_LM"),
}
# A user's own torch model (no transformers config, no task type): for the variants that name it.
OTHER_ARCHS: dict[str, tuple[Callable[[], nn.Module], str | None]] = {"mlp": (tiny_mlp, None)}

# Fields a method's config requires (no default) for a small example.
REQUIRED_SETTINGS: dict[str, dict[str, Any]] = {
    "PROMPT_TUNING": {"num_virtual_tokens": 4},
    "PREFIX_TUNING": {"num_virtual_tokens": 3},
}

# Variants of a method that take other code paths: name -> (peft_type, settings, architectures).
# (The ReLU bottleneck presets get 8 hidden units: d / 16 = 2 on these tiny models can both be dead.)
VARIANTS: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "lora": ("LORA", {}, ["mlp"]),
    "ia3": ("IA3", {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin1"]}, ["mlp"]),
    "lora-dora": ("LORA", {"use_dora": True}, ["llama", "gpt2"]),
    "lora-rslora": ("LORA", {"use_rslora": True, "r": 4, "lora_alpha": 16}, ["llama"]),
    "lora-embedding": ("LORA", {"target_modules": ["embed_tokens", "q_proj", "down_proj"]}, ["llama"]),
    "lora-all-linear": ("LORA", {"target_modules": "all-linear", "lora_dropout": 0.1}, ["bert"]),
    "bottleneck-pfeiffer": ("BOTTLENECK", {"placement": "pfeiffer", "bottleneck_size": 8}, ["llama"]),
    "bottleneck-parallel": ("BOTTLENECK", {"placement": "parallel", "bottleneck_size": 8}, ["llama", "bert"]),
    "prefix-projection": ("PREFIX_TUNING", {"prefix_projection": True, "encoder_hidden_size": 16}, ["llama"]),
}

# The second adapter of the mixed-batch test differs in shape where the method allows it.
SECOND_ADAPTER: dict[str, dict[str, Any]] = {
    "LORA": {"r": 2, "lora_alpha": 3},
    "BOTTLENECK": {"bottleneck_size": 4},
}

# Methods known not to merge (any other method must merge exactly).
NOT_MERGEABLE = {"BOTTLENECK", "PROMPT_TUNING", "PREFIX_TUNING"}

# Combinations PEFT cannot run (so there is nothing to compare against), with the reason.
PEFT_GAPS = {
    # PEFT 0.21 looks for a 'past_key_values' argument that transformers 5 calls 'cache'.
    ("PREFIX_TUNING", "bert"): "PEFT's prefix tuning does not run on BERT with transformers 5",
}


@dataclasses.dataclass(frozen=True)
class Case:
    peft_type: str
    arch: str
    settings: dict[str, Any]

    @property
    def task(self) -> str | None:
        return {**ARCHS, **OTHER_ARCHS}[self.arch][1]

    def base(self) -> nn.Module:
        return no_eos({**ARCHS, **OTHER_ARCHS}[self.arch][0]())

    def config(self, **extra: Any) -> dt.PeftConfig:
        return make_config(self.peft_type, self.task, **{**self.settings, **extra})


def make_config(peft_type: str, task: str | None, **settings: Any) -> dt.PeftConfig:
    """The registered config class of ``peft_type`` with the given fields (as a saved file would give)."""
    from deltatune.config import config_from_dict

    fields = {"peft_type": peft_type, "task_type": task, **REQUIRED_SETTINGS.get(peft_type, {}), **settings}
    return config_from_dict(fields)


def _cases() -> list[Any]:
    cases = [
        pytest.param(Case(method, arch, {}), id=f"{method.lower()}-{arch}")
        for method in dt.registered_methods()
        for arch in ARCHS
    ]
    for name, (method, settings, archs) in VARIANTS.items():
        cases += [pytest.param(Case(method, arch, settings), id=f"{name}-{arch}") for arch in archs]
    return cases


CASES = _cases()


def inputs(case: Case, batch: int = 3, length: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    if case.arch == "mlp":
        return {"x": torch.randn(batch, 10, generator=torch.Generator().manual_seed(seed))}
    x = token_ids(batch, length, seed)
    out = {"input_ids": x, "attention_mask": torch.ones_like(x)}
    if case.arch == "t5":
        out["decoder_input_ids"] = token_ids(batch, 4, seed + 1)
    return out


def run(model: nn.Module, kw: dict[str, torch.Tensor], **extra: Any) -> torch.Tensor:
    with torch.no_grad():
        return model_output(model(**kw, **extra))


def base_tensors(model: nn.Module) -> dict[int, torch.Tensor]:
    """The base model's own parameters and buffers, by identity (wrapping keeps these objects)."""
    return {id(t): t for t in [*model.parameters(), *model.buffers()]}


def added_parameters(model: nn.Module, base_ids: set[int]) -> dict[str, nn.Parameter]:
    """Parameters a method added to the base model (any that is not one of the base's own)."""
    return {n: p for n, p in model.named_parameters() if id(p) not in base_ids}


def perturb(params: dict[str, nn.Parameter], seed: int, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(params.items()):
            p.add_(torch.randn(p.shape, generator=g) * std)


def adapted(case: Case, seed: int = 5) -> tuple[dt.PeftModel, set[int]]:
    """The case's method on a fresh base, with noise on everything it added; and the base's tensor ids."""
    base = case.base()
    ids = set(base_tensors(base))
    model = dt.get_peft_model(base, case.config())
    added = added_parameters(model, ids)
    assert added, "the method added no parameter"
    perturb(added, seed)
    return model.eval(), ids


def same_positions(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both outputs over the positions of the real tokens: prompt tuning on a causal LM returns
    logits for its virtual tokens in front, which the base model (or a row without adapter) lacks."""
    if a.shape == b.shape:
        return a, b
    dim = next(i for i, (m, n) in enumerate(zip(a.shape, b.shape)) if m != n)
    n = min(a.shape[dim], b.shape[dim])
    return a.narrow(dim, a.shape[dim] - n, n), b.narrow(dim, b.shape[dim] - n, n)


# -- the contract --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_only_adapter_parameters_train(case: Case) -> None:
    base = case.base()
    own = base_tensors(base)
    before = {i: t.detach().clone() for i, t in own.items()}
    reference = run(case.base(), inputs(case))
    model = dt.get_peft_model(base, case.config())
    perturb(added_parameters(model, set(own)), seed=5)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing to train"
    assert not any(id(p) in own for p in trainable.values()), "a base parameter is trainable"
    assert model.get_nb_trainable_parameters()[0] == sum(p.numel() for p in trainable.values())
    snapshot = {n: p.detach().clone() for n, p in trainable.items()}
    model.train()
    opt = torch.optim.Adam(list(trainable.values()), lr=1e-2)
    for _ in range(2):
        model_output(model(**inputs(case))).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    moved = {n for n, p in trainable.items() if not torch.equal(p, snapshot[n])}
    assert moved == set(trainable), f"trainable but never updated: {sorted(set(trainable) - moved)}"
    for i, t in own.items():
        assert torch.equal(t, before[i]), "a base tensor changed"
    model.eval()
    with model.disable_adapter():
        torch.testing.assert_close(run(model, inputs(case)), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_save_load_round_trip(case: Case, tmp_path: Path) -> None:
    model, _ = adapted(case)
    kw = inputs(case)
    expected = run(model, kw)
    assert not torch.allclose(*same_positions(expected, run(case.base(), kw)), atol=1e-4), (
        "the adapter changes nothing"
    )
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    loaded = dt.PeftModel.from_pretrained(case.base(), tmp_path)
    assert loaded.peft_config["default"].peft_type == case.peft_type
    assert type(loaded.peft_config["default"]) is type(model.peft_config["default"])
    torch.testing.assert_close(run(loaded, kw), expected, rtol=0, atol=1e-6)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # inference mode unless asked
    trainable = dt.PeftModel.from_pretrained(case.base(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] > 0


@pytest.mark.parametrize("case", CASES)
def test_disable_adapter_gives_the_base_and_unload_returns_it(case: Case) -> None:
    model, base_ids = adapted(case)
    kw = inputs(case)
    adapted_out = run(model, kw)
    reference = run(case.base(), kw)
    with model.disable_adapter():
        torch.testing.assert_close(run(model, kw), reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(run(model, kw), adapted_out, rtol=0, atol=0)  # back on afterwards
    plain = model.unload()
    assert set(plain.state_dict()) == set(case.base().state_dict())
    if case.task != "SEQ_CLS":  # a task head's trained copy stays on the unloaded model (as in PEFT)
        torch.testing.assert_close(run(plain, kw), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_merge_equals_unmerged_or_is_refused(case: Case) -> None:
    model, _ = adapted(case)
    kw = inputs(case)
    expected = run(model, kw)
    if case.peft_type in NOT_MERGEABLE:
        for merge in (model.merge_adapter, model.merge_and_unload):
            with pytest.raises(ValueError, match="cannot be merged"):
                merge()
        torch.testing.assert_close(run(model, kw), expected, rtol=0, atol=0)
        return
    model.merge_adapter()
    torch.testing.assert_close(run(model, kw), expected, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(run(model, kw), expected, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():  # unmerging gave the base weights back
        torch.testing.assert_close(run(model, kw), run(case.base(), kw), rtol=1e-5, atol=1e-5)
    plain = model.merge_and_unload()
    assert set(plain.state_dict()) == set(case.base().state_dict())
    torch.testing.assert_close(run(plain, kw), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_mixed_batch_rows_equal_each_adapter_alone(case: Case) -> None:
    model, base_ids = adapted(case)
    model.add_adapter("b", case.config(**SECOND_ADAPTER.get(case.peft_type, {})))
    model.eval()  # a new adapter's dropout starts in training mode (as in PEFT)
    perturb({n: p for n, p in added_parameters(model, base_ids).items() if ".b." in f".{n}."}, seed=9)
    kw = inputs(case)
    rows = ["b", "__base__", "default"]
    mixed = run(model, kw, adapter_names=rows)
    alone = {}
    for name in ("default", "b"):
        model.set_adapter(name)
        alone[name] = run(model, kw)
    assert not torch.allclose(*same_positions(alone["default"], alone["b"]), atol=1e-4)
    with model.disable_adapter():
        alone["__base__"] = run(model, kw)
    for i, name in enumerate(rows):
        torch.testing.assert_close(*same_positions(mixed[i], alone[name][i]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", [c for c in CASES if c.values[0].task in ("CAUSAL_LM", "SEQ_2_SEQ_LM")])
def test_greedy_generate_equals_step_by_step_forward(case: Case) -> None:
    model, _ = adapted(case)
    x = token_ids(2, 5)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=5, do_sample=False)
    assert torch.equal(out, greedy_by_forward(model, x, 5, seq2seq=case.task == "SEQ_2_SEQ_LM"))


def _peft_type(case: Case) -> str | None:
    peft = pytest.importorskip("peft")
    if case.peft_type not in peft.PeftType.__members__:
        return None
    return PEFT_GAPS.get((case.peft_type, case.arch), "")


@pytest.mark.parametrize("case", CASES)
def test_files_load_in_peft_and_back(case: Case, tmp_path: Path) -> None:
    import peft

    gap = _peft_type(case)
    if gap is None:
        pytest.skip(f"PEFT has no {case.peft_type}")
    if gap:
        pytest.skip(gap)
    model, _ = adapted(case)
    kw = inputs(case)
    model.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(case.base(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(run(theirs, kw), run(model, kw), rtol=1e-5, atol=1e-5)
    # PEFT's own adapter, built from the same config file and trained (noise), loads here.
    config = peft.PeftConfig.from_pretrained(str(tmp_path / "ours"))
    config.inference_mode = False
    base = case.base()
    ids = set(base_tensors(base))
    made = peft.get_peft_model(base, config)
    perturb(added_parameters(made, ids), seed=11)
    made.eval()
    made.save_pretrained(str(tmp_path / "theirs"))
    ours = dt.PeftModel.from_pretrained(case.base(), tmp_path / "theirs")
    expected = run(made, kw)
    assert not torch.allclose(*same_positions(expected, run(case.base(), kw)), atol=1e-4)
    torch.testing.assert_close(run(ours, kw), expected, rtol=1e-5, atol=1e-5)


def test_every_registered_method_is_covered() -> None:
    """The cases above come from the registry; this fails if it is empty or a method has no case."""
    methods = set(dt.registered_methods())
    assert {"LORA", "IA3", "BOTTLENECK", "PROMPT_TUNING", "PREFIX_TUNING"} <= methods
    assert {c.values[0].peft_type for c in CASES} == methods
    assert {v[0] for v in VARIANTS.values()} <= methods
