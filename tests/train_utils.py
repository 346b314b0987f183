"""Helpers shared by the training tests: a real tokenizer, tiny models over its vocabulary, toy data."""

from __future__ import annotations

import functools
import random
from typing import Any

import torch
from torch import nn

VOCAB = 30522  # the bundled all-MiniLM-L6-v2 tokenizer's vocabulary


@functools.lru_cache(maxsize=1)
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from deltatune.assets import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


def tiny_bert_cls(num_labels: int = 2, seed: int = 0, dropout: float = 0.0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
        num_labels=num_labels, max_position_embeddings=128, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout, classifier_dropout=dropout, initializer_range=0.5,
    )  # fmt: skip
    return BertForSequenceClassification(cfg)


def tiny_llama_lm(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0, initializer_range=0.2,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def tiny_t5(seed: int = 0) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(
        d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=VOCAB, decoder_start_token_id=0,
        pad_token_id=0, dropout_rate=0.0, initializer_factor=10.0,
    )  # fmt: skip
    return T5ForConditionalGeneration(cfg)


POSITIVE = ["wonderful", "great", "lovely", "excellent", "happy", "bright", "sunny", "kind"]
NEGATIVE = ["terrible", "awful", "sad", "broken", "dark", "angry", "cold", "cruel"]


def toy_cls_records(n: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    """A separable two-class task: label 1 when the sentence holds a positive word."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        word = rng.choice(POSITIVE if label else NEGATIVE)
        out.append(
            {"text": f"the day was {word} and the {rng.choice(['dog', 'cat', 'bird'])} slept", "label": label}
        )
    return out


def toy_sft_records(n: int = 16) -> list[dict[str, Any]]:
    return [{"prompt": f"question {i}: what comes after {i}?", "completion": f" {i + 1}"} for i in range(n)]


def save_tiny_cls_model(folder: str, num_labels: int = 2) -> str:
    """A tiny BERT classifier + the real tokenizer, saved as a transformers model folder."""
    model = tiny_bert_cls(num_labels)
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def save_tiny_lm(folder: str) -> str:
    model = tiny_llama_lm()
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def train_tiny_classifier(out: str, batch: int, fsdp: bool = False) -> None:
    """Six LoRA steps on a tiny BERT classifier (run under torchrun by the distributed test, and in
    one process for its reference): the adapter goes to ``out/adapter``, the held-out loss of each
    rank to ``out/rank<r>-of-<world>.done``."""
    import os

    from deltatune import LoraConfig, get_peft_model
    from deltatune.train.data import Collator, DataSpec, encode
    from deltatune.train.loop import TrainConfig, Trainer

    tok = tokenizer()
    examples, _ = encode(toy_cls_records(32, seed=1), tok, DataSpec(task="seq_cls"))
    model = get_peft_model(
        tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])
    )
    cfg = TrainConfig(
        output_dir=out, quiet=True, log_every=100, plot=False, batch_size=batch, lr=1e-2, max_steps=6,
        grad_accum=2, fsdp=fsdp, save_every=3,
    )  # fmt: skip
    trainer = Trainer(model, examples, Collator(tok.pad_token_id, "seq_cls"), cfg, examples[:12])
    result = trainer.train()
    trainer.save_model(os.path.join(out, "adapter"))
    with open(os.path.join(out, f"rank{trainer.rank}-of-{trainer.world}.done"), "w") as fh:
        fh.write(str(result.eval_metrics["eval_loss"]))
