"""Trainable-parameter counts quoted in the docs, computed by deltatune on meta-device models.

Run: ``python docs/scripts/param_counts.py`` (a few seconds; no weights are allocated, nothing is
downloaded: the models are built from ``transformers`` configs on PyTorch's ``meta`` device).
It prints the table and writes ``docs/data/param_counts.json``, which the method pages and the
checklist quote and ``tests/test_docs_numbers.py`` checks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune import (
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OUT = Path(__file__).resolve().parents[1] / "data" / "param_counts.json"


def llama3_8b() -> nn.Module:
    """Llama-3-8B's architecture (32 layers, d=4096, 8 KV heads, FFN 14336, vocab 128256)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def bert_base() -> nn.Module:
    """BERT-base (12 layers, d=768, FFN 3072, vocab 30522): ``BertConfig()``'s defaults."""
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        return BertModel(BertConfig())


def counts(model_fn: Any, config: Any) -> dict[str, int]:
    model = get_peft_model(model_fn(), config)
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable": int(trainable), "all": int(total)}


def base_params(model_fn: Any) -> int:
    return sum(p.numel() for p in model_fn().parameters())


def compute() -> dict[str, dict[str, int]]:
    """Every count the docs quote, keyed by a short name."""
    lora = {"task_type": "CAUSAL_LM", "lora_alpha": 32, "target_modules": SEVEN}
    return {
        "llama3_8b_base": {"trainable": 0, "all": base_params(llama3_8b)},
        "llama3_8b_lora_r16": counts(llama3_8b, LoraConfig(r=16, **lora)),
        "llama3_8b_lora_r32": counts(llama3_8b, LoraConfig(r=32, **lora)),
        "llama3_8b_dora_r16": counts(llama3_8b, LoraConfig(r=16, use_dora=True, **lora)),
        "llama3_8b_ia3": counts(llama3_8b, IA3Config(task_type="CAUSAL_LM")),
        "llama3_8b_prompt_20": counts(
            llama3_8b, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)
        ),
        "llama3_8b_prefix_10": counts(
            llama3_8b, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10)
        ),
        "bert_base_base": {"trainable": 0, "all": base_params(bert_base)},
        "bert_base_lora_r8_qv": counts(bert_base, LoraConfig(r=8, target_modules=["query", "value"])),
        "bert_base_ia3": counts(bert_base, IA3Config()),
        "bert_base_prompt_20": counts(bert_base, PromptTuningConfig(num_virtual_tokens=20)),
        "bert_base_prefix_10": counts(bert_base, PrefixTuningConfig(num_virtual_tokens=10)),
        "bert_base_houlsby_m64": counts(bert_base, BottleneckConfig(placement="houlsby", bottleneck_size=64)),
        "bert_base_pfeiffer_m64": counts(
            bert_base, BottleneckConfig(placement="pfeiffer", bottleneck_size=64)
        ),
    }


def main() -> None:
    numbers = compute()
    for name, c in numbers.items():
        share = 100 * c["trainable"] / c["all"]
        print(f"{name:26s} {c['trainable']:>14,} of {c['all']:>14,}  {share:.4f} %")
    if "--no-write" not in sys.argv:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(numbers, indent=1) + "\n")


if __name__ == "__main__":
    main()
