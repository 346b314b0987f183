"""Trainer speed, measured side by side in one run (ratios, never absolute claims).

1. Overhead of deltatune's Trainer over a bare loop (forward, backward, AdamW step, zero_grad)
   on the same LoRA model and batches. Target: <= 5 %.
2. LoRA training tokens/s: deltatune (model + Trainer) vs transformers.Trainer + PEFT on the
   same model, data, batch size and steps. Target: ratio >= 1.

Runs alternate (A, B, A, B, ...) and the median of the per-round ratios is printed, so load
from other processes hits both sides alike.

    python benchmarks/bench_trainer.py [--rounds 5] [--steps 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")


def model_and_data(n: int):
    """A small BERT classifier (hidden 128, 4 layers) over the real tokenizer; fixed-length batches."""
    from transformers import BertConfig, BertForSequenceClassification

    from deltatune.train.data import Collator, DataSpec, encode
    from train_utils import tokenizer, toy_cls_records

    tok = tokenizer()
    examples, _ = encode(toy_cls_records(n), tok, DataSpec(task="seq_cls"))

    def make():
        torch.manual_seed(0)
        cfg = BertConfig(
            hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, vocab_size=30522,
            num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        return BertForSequenceClassification(cfg)

    return make, examples, Collator(tok.pad_token_id, "seq_cls")


LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["query", "key", "value", "dense"], "lora_dropout": 0.0}


def ours_model(make):
    from deltatune import LoraConfig, get_peft_model

    return get_peft_model(make(), LoraConfig(task_type="SEQ_CLS", **LORA))


def warm_up(model, examples, collator, bs: int) -> None:
    """A few untimed forward/backward passes at every batch shape, so kernel set-up is not timed."""
    model.train()
    lengths = {}
    for i in range(0, len(examples), bs):
        b = collator(examples[i : i + bs])
        lengths.setdefault(tuple(b["input_ids"].shape), b)
    for b in lengths.values():
        model(**b).loss.backward()
    model.zero_grad(set_to_none=True)


def bare_loop(model, examples, collator, steps: int, bs: int) -> float:
    warm_up(model, examples, collator, bs)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    batches = [collator(examples[(i * bs) % len(examples) :][:bs]) for i in range(steps)]
    model.train()
    t = time.perf_counter()
    for b in batches:
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def our_trainer(model, examples, collator, steps: int, bs: int, out: str) -> tuple[float, int]:
    from deltatune.train.loop import TrainConfig, Trainer

    warm_up(model, examples, collator, bs)
    cfg = TrainConfig(
        output_dir=out, max_steps=steps, batch_size=bs, lr=1e-3, quiet=True, log_every=10, plot=False,
        max_grad_norm=1.0, warmup_steps=2,
    )  # fmt: skip
    r = Trainer(model, examples, collator, cfg).train()
    return r.seconds, r.tokens


def hf_trainer(make, examples, collator, steps: int, bs: int, out: str) -> tuple[float, int]:
    import peft
    from transformers import Trainer, TrainingArguments

    model = peft.get_peft_model(make(), peft.LoraConfig(task_type="SEQ_CLS", **LORA))
    warm_up(model, examples, collator, bs)
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=bs, max_steps=steps, learning_rate=1e-3, report_to=[],
        save_strategy="no", logging_steps=10, use_cpu=True, disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0, warmup_steps=2, max_grad_norm=1.0,
    )  # fmt: skip
    tr = Trainer(model=model, args=args, train_dataset=examples, data_collator=collator)
    t = time.perf_counter()
    tr.train()
    seconds = time.perf_counter() - t
    return seconds, steps * bs * len(examples[0]["input_ids"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    make, examples, collator = model_and_data(a.steps * a.batch_size)
    overhead, speed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.rounds + 1):  # round 0 warms up
            t_bare = bare_loop(ours_model(make), examples, collator, a.steps, a.batch_size)
            t_ours, tokens = our_trainer(
                ours_model(make), examples, collator, a.steps, a.batch_size, f"{tmp}/o{i}"
            )
            t_hf, hf_tokens = hf_trainer(make, examples, collator, a.steps, a.batch_size, f"{tmp}/h{i}")
            if i:
                overhead.append(t_ours / t_bare - 1.0)
                speed.append((tokens / t_ours) / (hf_tokens / t_hf))
            print(
                f"round {i}: bare {t_bare:.2f}s  deltatune Trainer {t_ours:.2f}s  transformers.Trainer+PEFT {t_hf:.2f}s"
            )
    print(
        f"trainer overhead over a bare loop (median of {a.rounds}): {100 * statistics.median(overhead):+.1f} %  (target <= 5 %)"
    )
    print(
        f"LoRA tokens/s, deltatune / (transformers.Trainer + PEFT) (median): {statistics.median(speed):.2f}x  (target >= 1)"
    )


if __name__ == "__main__":
    main()
