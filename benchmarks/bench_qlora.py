"""QLoRA vs LoRA on the same model, in one run. Prints ratios (and a quality table).

    python benchmarks/bench_qlora.py [--threads 1] [--rounds 7] [--steps 80] [--skip-quality]

1. storage: bytes per parameter of the 4-bit linear weights (NF4 + double quantisation).
2. memory of a training step, QLoRA (NF4 base) / LoRA (fp32 base), on the Llama-shaped
   benchmark model (hidden 512, 4 layers, r=16 on all projections): the resident model
   (parameters + buffers + AdamW state) plus the step's transient peak, measured from the
   allocator's events with ``torch.profiler`` (profile_memory=True), so no sampling.
3. time of a training step (forward, backward, AdamW), QLoRA / LoRA, interleaved medians.
4. quality: the real all-MiniLM-L6-v2 fine-tuned for a short run on a two-topic sentence
   classification task built from word lists (train / held-out split), with LoRA (fp32
   base), QLoRA (NF4 base) and LoftQ (NF4 base, 4 steps, from the original weights).

One thread by default (``torch.set_num_threads(1)``): the machine is shared, and ratios are
steadier when each variant cannot be starved of a second core.
"""

from __future__ import annotations

import argparse
import copy
import random
import time
import warnings
from typing import Any

import torch
from torch import nn

import deltatune as dt
from common import LLAMA_PROJECTIONS, build_llama, interleaved_medians, print_table, train_step_fn
from deltatune.quant import loftq_initialize, memory_footprint, quantize_model


def lora(base: nn.Module, **kw: Any) -> dt.PeftModel:
    torch.manual_seed(1)
    cfg = {"r": 16, "lora_alpha": 32, "target_modules": LLAMA_PROJECTIONS, **kw}
    return dt.get_peft_model(base, dt.LoraConfig(**cfg))


def resident_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    state = sum(t.nbytes for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    return sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers()) + state


def step_peak_bytes(step: Any) -> int:
    """Transient peak of one call of ``step`` above what was allocated before it: the running sum
    of the allocator's alloc (+) / free (-) events that the profiler records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]  # type: ignore[union-attr]
    level = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        level += e.nbytes()
        peak = max(peak, level)
    return peak


def memory_and_time(rounds: int) -> None:
    base = build_llama()
    q_base = quantize_model(copy.deepcopy(base))
    fp = memory_footprint(q_base)
    print_table(
        "Storage of the 4-bit linear weights (target ≤ 0.52 bytes/param)",
        [
            ("bytes / param", f"{fp['nf4_bytes'] / fp['nf4_params']:.4f}"),
            ("bits / param", f"{fp['nf4_bits_per_param']:.3f}"),
            ("fp32 bytes / param", "4.0000"),
        ],
        ("", "value"),
    )
    ids = torch.randint(0, 4096, (4, 128), generator=torch.Generator().manual_seed(0))
    models = {"LoRA (fp32 base)": lora(base), "QLoRA (NF4 base)": lora(q_base)}
    opts = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
        for name, m in models.items()
    }
    steps = {name: train_step_fn(m, ids, opts[name]) for name, m in models.items()}
    for fn in steps.values():  # AdamW state exists after the first step
        fn()
    rows = []
    mem = {}
    for name, m in models.items():
        resident = resident_bytes(m, opts[name])
        peak = step_peak_bytes(steps[name])
        mem[name] = (resident, peak)
        rows.append(
            (name, f"{resident / 2**20:.1f}", f"{peak / 2**20:.1f}", f"{(resident + peak) / 2**20:.1f}")
        )
    print_table(
        "Memory of a training step (MiB; batch 4 x 128 tokens)", rows, ("", "resident", "step peak", "total")
    )
    times = interleaved_medians(steps, rounds=rounds, warmup=1)
    (lr, lp), (qr, qp) = mem["LoRA (fp32 base)"], mem["QLoRA (NF4 base)"]
    print_table(
        "Ratios QLoRA / LoRA (same model, same adapter)",
        [
            ("resident memory", f"{qr / lr:.3f}"),
            ("step transient peak", f"{qp / lp:.3f}"),
            ("total peak memory", f"{(qr + qp) / (lr + lp):.3f}"),
            ("training step time", f"{times['QLoRA (NF4 base)'] / times['LoRA (fp32 base)']:.2f}"),
        ],
        ("", "QLoRA / LoRA"),
    )


# -- quality on MiniLM ---------------------------------------------------------------------------

_WORDS = (
    "football goal match team player coach league stadium score referee season tournament striker keeper",
    "bread cheese soup recipe kitchen oven sugar butter salad dinner flavour garlic pasta baker",
)
TOPICS = [w.split() for w in _WORDS]
FILLER = list(
    [
        "the",
        "a",
        "this",
        "that",
        "my",
        "our",
        "their",
        "every",
        "some",
        "with",
        "and",
        "then",
        "today",
        "really",
    ]
)


def topic_data(n: int, seed: int) -> list[tuple[str, int]]:
    """Sentences of filler words and three topic words, two of the labelled topic and one of the
    other, so that no single word decides the label."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.sample(FILLER, 6) + rng.sample(TOPICS[label], 2) + rng.sample(TOPICS[1 - label], 1)
        rng.shuffle(words)
        out.append((" ".join(words), label))
    return out


def quality(steps: int) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltatune.assets import default_model_path

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    train, test = topic_data(512, 0), topic_data(256, 1)

    def encode(rows: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        enc = tok(
            [t for t, _ in rows], padding="max_length", max_length=16, truncation=True, return_tensors="pt"
        )
        return {**enc, "labels": torch.tensor([y for _, y in rows])}

    train_t, test_t = encode(train), encode(test)

    def fresh() -> nn.Module:
        torch.manual_seed(0)  # the same classifier head for every variant
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    targets = ["query", "key", "value", "dense"]
    config = {"r": 16, "lora_alpha": 32, "target_modules": targets, "task_type": "SEQ_CLS"}
    original = fresh().state_dict()
    variants: dict[str, nn.Module] = {}
    variants["LoRA (fp32 base)"] = dt.get_peft_model(fresh(), dt.LoraConfig(**config))
    variants["QLoRA (NF4 base)"] = dt.get_peft_model(quantize_model(fresh()), dt.LoraConfig(**config))
    loftq = dt.get_peft_model(quantize_model(fresh()), dt.LoraConfig(**config))
    report = loftq_initialize(loftq, original, loftq_config=dt.LoftQConfig(loftq_bits=4, loftq_iter=4))
    variants["LoftQ (NF4 base, T=4)"] = loftq

    rows = []
    for name, model in variants.items():
        torch.manual_seed(0)
        with torch.no_grad():
            model.eval()
            start_loss = float(model(**test_t).loss)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        order = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        losses = []
        for _ in range(steps):
            idx = torch.randint(0, len(train), (16,), generator=order)
            loss = model(**{k: v[idx] for k, v in train_t.items()}).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        seconds = time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            out = model(**test_t)
        acc = float((out.logits.argmax(-1) == test_t["labels"]).float().mean())
        last = sum(losses[-10:]) / 10
        rows.append(
            (
                name,
                f"{start_loss:.4f}",
                f"{last:.4f}",
                f"{float(out.loss):.4f}",
                f"{acc:.3f}",
                f"{seconds:.1f}",
            )
        )
    print_table(
        f"Quality: all-MiniLM-L6-v2, 2-topic classification, {steps} steps of 16, r=16 on q/k/v/dense",
        rows,
        ("", "held-out loss at start", "train loss (last 10)", "held-out loss", "held-out acc", "seconds"),
    )
    print(
        f"LoftQ start: relative weight error {report.loftq_relative:.4f} vs QLoRA's {report.qlora_relative:.4f} "
        f"(all {len(report.layers)} targeted layers)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    memory_and_time(args.rounds)
    if not args.skip_quality:
        quality(args.steps)


if __name__ == "__main__":
    main()
