"""TRL's SFTTrainer and DPOTrainer with deltatune LoRA vs with PEFT LoRA: training tokens/s and
peak resident memory, same model, data and settings.

Both sides run the same script: a plain transformers model and ``peft_config=<library>.LoraConfig``
(TRL wraps the model; for DPO the reference is the model with its adapter disabled, no second
copy). Each measurement runs in a fresh subprocess, alternating deltatune and PEFT, and the script
prints the median of each side and their ratios.

Memory, per run: ``peak RSS`` is the process's peak resident set (``getrusage`` ru_maxrss:
imports, model, data and training together); ``train peak`` is that peak minus the resident set
just before ``trainer.train()`` (what training itself adds: activations, gradients, optimizer
state, the reference pass). Run: ``python benchmarks/bench_trl.py [--rounds 3] [--steps 20]
[--trainer sft dpo]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, tempfile, time
import psutil, torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

kind, lib, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
torch.set_num_threads(1)
base = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=4, vocab_size=512, pad_token_id=0))
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
if lib == "deltatune":
    import deltatune as library
else:
    import peft as library
config = library.LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM")
vocab = {"<pad>": 0, **{f"w{i}": i for i in range(1, 512)}}
wl = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
wl.pre_tokenizer = pre_tokenizers.Whitespace()
tok = PreTrainedTokenizerFast(tokenizer_object=wl, pad_token="<pad>", eos_token="w1")
words = lambda i, n: " ".join(f"w{(i * 37 + j * 11) % 500 + 2}" for j in range(n))
common = dict(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=8, report_to=[],
    use_cpu=True, bf16=False, disable_tqdm=True, save_strategy="no", logging_strategy="no")
if kind == "sft":
    from trl import SFTConfig, SFTTrainer
    data = Dataset.from_dict({"text": [words(i, 127) for i in range(8 * steps)]})
    trainer = SFTTrainer(model=base, args=SFTConfig(**common, max_length=128), train_dataset=data,
        processing_class=tok, peft_config=config)
    tokens = steps * 8 * 128
else:
    from trl import DPOConfig, DPOTrainer
    n = 8 * steps
    data = Dataset.from_dict({"prompt": [words(i, 64) for i in range(n)], "chosen": [words(i + 1, 63) for i in range(n)],
        "rejected": [words(i + 2, 63) for i in range(n)]})
    trainer = DPOTrainer(model=base, args=DPOConfig(**common, max_length=128), train_dataset=data,
        processing_class=tok, peft_config=config)
    assert trainer.ref_model is None
    tokens = steps * 8 * 2 * 128  # chosen and rejected sequences, 128 tokens each
assert type(trainer.model).__module__.startswith(lib), type(trainer.model)
before = psutil.Process().memory_info().rss / 2**20
start = time.perf_counter()
trainer.train()
elapsed = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"tokens_per_s": tokens / elapsed, "peak_rss_mb": peak, "train_peak_mb": peak - before}))
"""


def run(kind: str, lib: str, steps: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, lib, str(steps)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} / {lib} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--trainer", nargs="+", choices=["sft", "dpo"], default=["sft", "dpo"])
    a = parser.parse_args()
    for kind in a.trainer:
        results: dict[str, list[dict[str, float]]] = {"deltatune": [], "peft": []}
        for _ in range(a.rounds):
            for lib in ("deltatune", "peft"):
                results[lib].append(run(kind, lib, a.steps))
        med = {lib: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for lib, rs in results.items()}
        print(f"{kind.upper()} ({a.rounds} rounds, {a.steps} steps of 8 x 128 tokens, medians)")
        for lib, m in med.items():
            print(
                f"  {lib:10s} tokens/s {m['tokens_per_s']:9.0f}   peak RSS {m['peak_rss_mb']:7.0f} MB"
                f"   train peak {m['train_peak_mb']:6.0f} MB"
            )
        for key, label in (
            ("tokens_per_s", "tokens/s"),
            ("peak_rss_mb", "peak RSS"),
            ("train_peak_mb", "train peak"),
        ):
            print(f"  {label} ratio (deltatune / PEFT): {med['deltatune'][key] / med['peft'][key]:.3f}")


if __name__ == "__main__":
    main()
