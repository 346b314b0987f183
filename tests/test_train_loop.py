"""The trainer: learns, touches only trainable weights, schedule, accumulation, checkpointing, early stop."""

from __future__ import annotations

import json
import os

import pytest
import torch

from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.train.data import Collator, DataSpec, encode
from deltatune.train.loop import TrainConfig, Trainer, lr_lambda
from train_utils import tiny_bert_cls, tiny_llama_lm, tiny_t5, tokenizer, toy_cls_records, toy_sft_records

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _cls_setup(n: int = 64, dropout: float = 0.0, r: int = 4, seed: int = 0):
    tok = tokenizer()
    train, _ = encode(toy_cls_records(n, seed=1), tok, DataSpec(task="seq_cls"))
    evals, _ = encode(toy_cls_records(32, seed=2), tok, DataSpec(task="seq_cls"))
    model = get_peft_model(
        tiny_bert_cls(seed=seed, dropout=dropout),
        LoraConfig(
            task_type="SEQ_CLS",
            r=r,
            lora_alpha=2 * r,
            target_modules=["query", "key", "value", "dense"],
            lora_dropout=dropout,
        ),
    )
    return model, train, evals, Collator(tok.pad_token_id, "seq_cls")


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = {
        "output_dir": str(tmp_path / "run"),
        "quiet": True,
        "log_every": 1,
        "plot": False,
        "batch_size": 8,
        "lr": 1e-2,
    }
    return TrainConfig(**{**base, **kw})


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.get_adapter_state_dict().items()}


def test_training_learns_and_leaves_the_base_frozen(tmp_path, capsys):
    model, train, evals, collator = _cls_setup()
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = Trainer(model, train, collator, _cfg(tmp_path, epochs=6, eval_every=8), evals)
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    before = trainer.evaluate()
    result = trainer.train()
    assert result.steps == 48 and result.eval_metrics["accuracy"] >= 0.9 > before["accuracy"]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 49))
    assert rows[-1]["accuracy"] == result.eval_metrics["accuracy"]
    assert sum("eval_loss" in r for r in rows) == 6  # steps 8..40, and the final evaluation
    assert rows[0]["loss"] > rows[-2]["loss"]
    out = capsys.readouterr().out
    assert "step 10/48 loss" in out and "tok/s" in out and "eta" in out  # quiet mode: plain log lines


def test_lr_schedule_warmup_then_decay():
    fn = lr_lambda(total=10, warmup=4, kind="linear")
    assert [round(fn(s), 3) for s in range(10)] == [0.2, 0.4, 0.6, 0.8, 1.0, 0.833, 0.667, 0.5, 0.333, 0.167]
    cos = lr_lambda(total=10, warmup=0, kind="cosine")
    assert cos(0) == 1.0 and abs(cos(5) - 0.5) < 1e-9
    assert lr_lambda(10, 2, "constant")(9) == 1.0


def test_scheduler_in_the_loop(tmp_path):
    model, train, _, collator = _cls_setup(n=32)
    trainer = Trainer(model, train, collator, _cfg(tmp_path, max_steps=10, warmup_steps=4, lr=1.0))
    trainer.train()
    lrs = [h["lr"] for h in trainer.history]
    assert [round(x, 3) for x in lrs] == [0.4, 0.6, 0.8, 1.0, 0.833, 0.667, 0.5, 0.333, 0.167, 0.0]


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    results = []
    for bs, accum in [(8, 1), (4, 2)]:
        model, train, _, collator = _cls_setup(n=32)
        Trainer(
            model,
            train,
            collator,
            _cfg(tmp_path / f"{bs}", batch_size=bs, grad_accum=accum, max_steps=3, lr=1e-3),
        ).train()
        results.append(_lora_state(model))
    assert results[0].keys() == results[1].keys()
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_gradient_accumulation_weights_micro_batches_by_their_tokens(tmp_path, method):
    """Causal LM rows with very different numbers of labelled tokens: 2 x grad-accum 4 gives
    the adapter of one batch of 8 (the loss is one mean over all tokens of the step, not a mean
    of per-micro-batch means). Prompt tuning's virtual tokens shift which positions count."""
    from deltatune import PromptTuningConfig

    tok = tokenizer()
    # Plain text: every token is labelled, so whether the first position counts matters too.
    records = [{"text": " ".join(str(j) for j in range(2 + 5 * (i % 3)))} for i in range(8)]
    examples, _ = encode(records, tok, DataSpec(task="causal_lm", max_length=64))
    counts = {int((torch.tensor(e["labels"]) != -100).sum()) for e in examples}
    assert len(counts) == 3 and all(e["labels"][0] != -100 for e in examples)  # unequal micro-batches
    results = []
    for bs, accum in [(8, 1), (2, 4)]:
        config = (
            LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=LLAMA_ALL)
            if method == "lora"
            else PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
        )
        model = get_peft_model(tiny_llama_lm(), config)
        Trainer(
            model,
            examples,
            Collator(0, "causal_lm"),
            _cfg(tmp_path / f"{method}{bs}", batch_size=bs, grad_accum=accum, max_steps=2, lr=1e-3),
            task="causal_lm",
        ).train()
        results.append(_lora_state(model))
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], atol=1e-5, rtol=1e-4)


def test_gradient_clipping_bounds_the_update(tmp_path):
    model, train, _, collator = _cls_setup(n=16)
    trainer = Trainer(model, train, collator, _cfg(tmp_path, max_steps=1, max_grad_norm=1e-3, lr=1e-3))
    seen = []
    orig = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        total = orig(params, max_norm, *a, **k)
        seen.append(
            torch.norm(torch.stack([p.grad.norm() for p in trainer.params if p.grad is not None])).item()
        )
        return total

    torch.nn.utils.clip_grad_norm_ = spy
    try:
        trainer.train()
    finally:
        torch.nn.utils.clip_grad_norm_ = orig
    assert seen and seen[0] <= 1e-3 * 1.01


def test_gradient_checkpointing_with_lora_gives_the_same_adapter(tmp_path):
    states = []
    for gc in (False, True):
        model, train, _, collator = _cls_setup(n=16)
        Trainer(
            model, train, collator, _cfg(tmp_path / str(gc), max_steps=3, gradient_checkpointing=gc)
        ).train()
        assert model.get_base_model().is_gradient_checkpointing == gc
        states.append(_lora_state(model))
    for k in states[0]:
        assert not torch.equal(states[0][k], torch.zeros_like(states[0][k])) or "lora_B" not in k
        torch.testing.assert_close(states[0][k], states[1][k], atol=1e-5, rtol=1e-4)


def test_bf16_autocast_on_cpu_trains(tmp_path):
    model, train, _, collator = _cls_setup(n=16)
    before = _lora_state(model)
    Trainer(model, train, collator, _cfg(tmp_path, max_steps=2, mixed_precision="bf16")).train()
    after = _lora_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(v.dtype == torch.float32 for v in after.values())  # master weights stay fp32
    with pytest.raises(ValueError, match="CUDA"):
        Trainer(model, train, collator, _cfg(tmp_path, mixed_precision="fp16"))


def test_early_stopping_restores_the_best_weights(tmp_path, capsys):
    model, train, evals, collator = _cls_setup()
    # a learning rate this large wrecks the model after the first evaluations
    trainer = Trainer(
        model, train, collator, _cfg(tmp_path, epochs=20, eval_every=2, early_stopping_patience=2, lr=3.0, warmup_steps=0, max_grad_norm=0), evals
    )  # fmt: skip
    result = trainer.train()
    assert result.stopped_early and result.steps < trainer.total_steps
    evals_seen = [h for h in result.history if "accuracy" in h]
    assert result.eval_metrics["accuracy"] == pytest.approx(max(h["accuracy"] for h in evals_seen[:-1]))
    assert "Early stopping at step" in capsys.readouterr().out


def test_run_folder_has_config_metrics_plot_and_an_interoperable_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    model, train, evals, collator = _cls_setup(n=16)
    cfg = _cfg(tmp_path, max_steps=4, plot=True)
    trainer = Trainer(model, train, collator, cfg, evals, run_info={"method": "lora"})
    trainer.train()
    trainer.save_model(os.path.join(cfg.output_dir, "adapter"))
    run = tmp_path / "run"
    assert {"config.yaml", "metrics.jsonl", "plot.png", "adapter"} <= set(os.listdir(run))
    assert (run / "plot.png").read_bytes()[:4] == b"\x89PNG"
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 4 and saved["method"] == "lora"
    ours = PeftModel.from_pretrained(tiny_bert_cls(), str(run / "adapter")).eval()
    theirs = peft.PeftModel.from_pretrained(tiny_bert_cls(), str(run / "adapter")).eval()
    batch = collator(evals[:4])
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(**batch).logits, model.eval()(**batch).logits, atol=1e-5, rtol=1e-5)


def test_causal_lm_sft_and_packing_lower_the_loss(tmp_path):
    tok = tokenizer()
    for packing in (False, True):
        examples, _ = encode(
            toy_sft_records(16), tok, DataSpec(task="causal_lm", packing=packing, max_length=64)
        )
        model = get_peft_model(
            tiny_llama_lm(), LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=LLAMA_ALL)
        )
        trainer = Trainer(
            model,
            examples,
            Collator(0, "causal_lm"),
            _cfg(tmp_path / str(packing), max_steps=20, lr=5e-2),
            examples,
            task="causal_lm",
        )
        before = trainer.evaluate()["eval_loss"]
        result = trainer.train()
        assert result.eval_metrics["eval_loss"] < before - 1.0
        assert "perplexity" in result.eval_metrics


def test_seq2seq_trains(tmp_path):
    tok = tokenizer()
    records = [{"source": f"copy {w}", "target": w} for w in ["red", "green", "blue", "black"] * 4]
    examples, _ = encode(records, tok, DataSpec(task="seq2seq"))
    model = get_peft_model(
        tiny_t5(), LoraConfig(task_type="SEQ_2_SEQ_LM", r=8, target_modules=["q", "k", "v", "o", "wi", "wo"])
    )
    trainer = Trainer(
        model,
        examples,
        Collator(0, "seq2seq"),
        _cfg(tmp_path, max_steps=20, lr=5e-2),
        examples,
        task="seq2seq",
    )
    before = trainer.evaluate()["eval_loss"]
    assert trainer.train().eval_metrics["eval_loss"] < before - 1.0


def test_full_fine_tuning_and_no_trainable_parameters(tmp_path):
    model = tiny_bert_cls()
    tok = tokenizer()
    train, _ = encode(toy_cls_records(16), tok, DataSpec(task="seq_cls"))
    collator = Collator(tok.pad_token_id, "seq_cls")
    Trainer(model, train, collator, _cfg(tmp_path, max_steps=2)).train()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(model, train, collator, _cfg(tmp_path))
