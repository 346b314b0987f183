"""LoftQ: config, the alternating quantise / SVD algorithm, its use through LoraConfig and on
4-bit models, the error report, and the acceptance check on the real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.quant import (
    Linear4bit,
    LoftQConfig,
    loftq_decompose,
    loftq_initialize,
    loftq_report,
    quantize_dequantize,
    quantize_model,
)
from helpers import tiny_gpt2, tiny_llama

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def ids(batch: int = 3, length: int = 7) -> torch.Tensor:
    return torch.randint(1, 96, (batch, length), generator=torch.Generator().manual_seed(1))


def loftq_lora(bits: int = 4, iters: int = 1, **kw: object) -> dt.LoraConfig:
    settings: dict[str, object] = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS}
    return dt.LoraConfig(
        **{**settings, **kw},
        init_lora_weights="loftq",
        loftq_config=LoftQConfig(loftq_bits=bits, loftq_iter=iters),
    )


# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 3, 16, "4"])
def test_bits_other_than_2_4_8_are_refused(bits):
    with pytest.raises(ValueError, match="2, 4"):
        LoftQConfig(loftq_bits=bits)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2, 4"):
        dt.get_peft_model(
            tiny_llama(),
            dt.LoraConfig(
                target_modules=TARGETS, init_lora_weights="loftq", loftq_config={"loftq_bits": bits}
            ),
        )


def test_bad_iterations_and_missing_config_are_refused():
    with pytest.raises(ValueError, match="loftq_iter"):
        LoftQConfig(loftq_iter=0)
    with pytest.raises(ValueError, match="needs loftq_config"):
        dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=TARGETS, init_lora_weights="loftq"))


def test_dict_config_and_exports():
    assert dt.LoftQConfig is LoftQConfig
    model = dt.get_peft_model(
        tiny_llama(),
        dt.LoraConfig(
            target_modules=TARGETS, init_lora_weights="loftq", loftq_config={"loftq_bits": 8, "loftq_iter": 2}
        ),
    )
    assert loftq_report(model).bits == 8 and loftq_report(model).num_iter == 2


# -- the algorithm ------------------------------------------------------------------------------


def test_decompose_uses_the_scaling_and_beats_plain_quantisation():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    one = loftq_decompose(w, rank=8, scaling=1.0, num_iter=1)
    four = loftq_decompose(w, rank=8, scaling=4.0, num_iter=1)
    # Q_1 is the plain NF4 quantisation: QLoRA's start.
    torch.testing.assert_close(one.q, quantize_dequantize(w, 4))
    assert one.qlora_error == pytest.approx(float(torch.linalg.matrix_norm(w - one.q)))
    # s·B A is the rank-8 SVD of W − Q whatever s is: the factors absorb the scaling.
    torch.testing.assert_close(one.b @ one.a, 4.0 * (four.b @ four.a), atol=1e-5, rtol=1e-4)
    u, sv, vh = torch.linalg.svd(w - one.q)
    best = (u[:, :8] * sv[:8]) @ vh[:8]
    torch.testing.assert_close(one.b @ one.a, best, atol=1e-5, rtol=1e-4)
    assert one.errors[0] == pytest.approx(float(torch.linalg.matrix_norm(w - one.q - best)), rel=1e-5)
    assert one.errors[0] < one.qlora_error


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_each_bit_width_quantises_and_loftq_helps(bits):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    res = loftq_decompose(w, rank=8, scaling=2.0, bits=bits, num_iter=3)
    rel = res.qlora_error / res.weight_norm
    expected = {2: (0.3, 0.7), 4: (0.05, 0.15), 8: (0.001, 0.02)}[bits]  # coarser codes, larger error
    assert expected[0] < rel < expected[1]
    assert res.errors[-1] < res.errors[0] < res.qlora_error
    levels = torch.unique(quantize_dequantize(w[:1, :64], bits) / w[:1, :64].abs().max())
    assert len(levels) <= 2**bits


def test_rank_above_matrix_size_is_padded():
    w = torch.randn(8, 16)
    res = loftq_decompose(w, rank=12, scaling=1.0)
    assert res.a.shape == (12, 16) and res.b.shape == (8, 12)
    assert res.errors[0] < 1e-4  # full rank: Q + s·BA reproduces W


# -- through LoraConfig on a full-precision model -------------------------------------------------


def test_loftq_replaces_weights_by_q_and_starts_closer_to_the_original():
    full = tiny_llama()
    model = dt.get_peft_model(copy.deepcopy(full), loftq_lora(iters=2))
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    w = full.model.layers[0].self_attn.q_proj.weight
    assert type(q_proj.base_layer) is nn.Linear
    # The stored weight is an NF4 value: quantising it again gives it back (up to the re-rounding of
    # the double-quantised block scales, ~1e-4 relative).
    stored = q_proj.base_layer.weight.detach()
    torch.testing.assert_close(quantize_dequantize(stored, 4), stored, atol=2e-5, rtol=1e-3)
    assert not torch.allclose(stored, w, atol=1e-3)
    # Q + s·BA is closer to W than Q (the QLoRA start that disable_adapter shows).
    delta = q_proj.delta_weight("default").detach()
    assert torch.linalg.matrix_norm(w - stored - delta) < torch.linalg.matrix_norm(w - stored)
    x = ids()
    qlora = dt.get_peft_model(quantize_model(copy.deepcopy(full)), dt.LoraConfig(r=4, target_modules=TARGETS))
    with torch.no_grad():
        ref = full(input_ids=x).logits
        ours = model(input_ids=x).logits
        with model.disable_adapter():
            start_q = model(input_ids=x).logits
        plain = qlora(input_ids=x).logits
    assert (ours - ref).abs().mean() < (start_q - ref).abs().mean()
    assert (ours - ref).abs().mean() < (plain - ref).abs().mean()
    report = loftq_report(model)
    assert len(report.layers) == 2 * len(TARGETS)
    assert report.loftq_error < report.qlora_error
    assert "total" in str(report) and "model.layers.0.self_attn.q_proj" in str(report)


def test_loftq_on_gpt2_conv1d_and_with_dora():
    full = tiny_gpt2()
    model = dt.get_peft_model(
        copy.deepcopy(full),
        dt.LoraConfig(
            r=4,
            target_modules=["c_attn"],
            init_lora_weights="loftq",
            loftq_config=LoftQConfig(),
            use_dora=True,
        ),
    )
    layer = model.get_base_model().transformer.h[0].attn.c_attn
    w = full.transformer.h[0].attn.c_attn.weight  # (in, out)
    stored = layer.base_layer.weight.detach()
    assert torch.linalg.matrix_norm(
        w - stored - layer.delta_weight("default").detach()
    ) < torch.linalg.matrix_norm(w - stored)
    # DoRA's magnitude starts at the row norms of Q + s·BA, so the adapted output equals the LoRA one.
    dense = (stored + layer.delta_weight("default").detach()).T
    torch.testing.assert_close(
        layer.lora_magnitude_vector["default"].detach(), dense.norm(dim=1), atol=1e-5, rtol=1e-5
    )


def test_saved_loftq_adapter_records_plain_init_and_loads_in_peft(tmp_path):
    import peft

    model = dt.get_peft_model(tiny_llama(), loftq_lora())
    model.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["loftq_config"] == {}
    base_q = copy.deepcopy(model).unload()  # the base with Q, as the user saves it
    theirs = peft.PeftModel.from_pretrained(base_q, tmp_path / "a")
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5, rtol=1e-5
        )


# -- on a model that is already 4-bit ------------------------------------------------------------------


def test_loftq_on_4bit_model_warns_and_loftq_initialize_uses_original_weights():
    full = tiny_llama()
    q_model = quantize_model(copy.deepcopy(full), target_modules=TARGETS)  # the rest stays dense, as below
    with pytest.warns(UserWarning, match="loftq_initialize"):
        model = dt.get_peft_model(q_model, loftq_lora(iters=3))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, Linear4bit)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # plain QLoRA start until initialised
    codes_before = layer.base_layer.weight_packed.clone()

    report = loftq_initialize(model, full.state_dict())
    assert report.num_iter == 3 and len(report.layers) == 2 * len(TARGETS)
    assert report.loftq_error < 0.95 * report.qlora_error
    assert not torch.equal(codes_before, layer.base_layer.weight_packed)  # Q_3 replaced the NF4 codes
    # Same result as LoftQ on the full-precision model, where Q stays dense.
    dense = dt.get_peft_model(copy.deepcopy(full), loftq_lora(iters=3))
    d_layer = dense.get_base_model().model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.base_layer.dequantize(), d_layer.base_layer.weight.detach())
    torch.testing.assert_close(layer.lora_A["default"].weight, d_layer.lora_A["default"].weight)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, dense(input_ids=x).logits, atol=1e-5, rtol=1e-5)
    # Keys with another prefix are found; a missing weight is a clear error.
    prefixed = {"llama." + k: v for k, v in full.state_dict().items()}
    loftq_initialize(model, prefixed, loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    with pytest.raises(ValueError, match="no weight for"):
        loftq_initialize(model, {"unrelated.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="cannot be stored"):
        loftq_initialize(model, full, loftq_config=LoftQConfig(loftq_bits=8))


# -- acceptance: the real all-MiniLM-L6-v2 weights at r = 16 ----------------------------------------------


def test_minilm_loftq_error_is_clearly_lower_and_falls_with_steps():
    from transformers import AutoModel

    from deltatune.assets import default_model_path

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModel.from_pretrained(default_model_path())
    linears = [
        name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("encoder.")
    ]
    assert len(linears) == 36  # 6 layers × (q, k, v, o, intermediate, output)
    # The first and the last layer (12 weights): the figures below hold for each layer alike (all 36
    # give 0.094 and 0.930, 0.848 of it at T = 1, 5), at a third of the SVDs.
    weights = [
        model.get_submodule(n).weight
        for n in linears
        if n.startswith(("encoder.layer.0.", "encoder.layer.5."))
    ]
    scaling = 32 / 16  # lora_alpha = 32, r = 16
    results = [loftq_decompose(w, rank=16, scaling=scaling, bits=4, num_iter=5) for w in weights]
    norm = sum(r.weight_norm**2 for r in results) ** 0.5
    qlora = sum(r.qlora_error**2 for r in results) ** 0.5 / norm
    per_step = [sum(r.errors[t] ** 2 for r in results) ** 0.5 / norm for t in range(5)]
    assert 0.08 < qlora < 0.11  # NF4's relative error on real weights
    assert per_step[0] < 0.96 * qlora  # T = 1 already absorbs part of it
    assert per_step[4] < 0.9 * qlora  # clearly lower at T = 5
    assert all(b < a for a, b in zip(per_step, per_step[1:])), per_step  # falls with every step
    # Through the config, T = 1 gives the first step's numbers (one layer checked, to stay fast).
    pm = dt.get_peft_model(
        model,
        dt.LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=["query"],
            layers_to_transform=[0],
            init_lora_weights="loftq",
            loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1),
        ),
    )
    (row,) = loftq_report(pm).layers
    assert row.loftq_error == pytest.approx(results[0].errors[0], rel=1e-4)
