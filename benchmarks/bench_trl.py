"""TRL SFTTrainer with a deltatune LoRA model vs with a PEFT LoRA model: training tokens/s and
peak resident memory, same model, data and settings.

Each measurement runs in a fresh subprocess (so peak memory is that run's own), alternating
deltatune and PEFT, and the script prints the median of each side and their ratio. Run:
``python benchmarks/bench_trl.py [--rounds 3] [--steps 20]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, tempfile, time
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

lib, steps = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
torch.set_num_threads(1)
base = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=4, vocab_size=512, pad_token_id=0))
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
if lib == "deltatune":
    import deltatune
    model = deltatune.get_peft_model(base, deltatune.LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM"))
else:
    import peft
    model = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM"))
vocab = {"<pad>": 0, **{f"w{i}": i for i in range(1, 512)}}
wl = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
wl.pre_tokenizer = pre_tokenizers.Whitespace()
tok = PreTrainedTokenizerFast(tokenizer_object=wl, pad_token="<pad>", eos_token="w1")
texts = [" ".join(f"w{(i * 37 + j * 11) % 500 + 2}" for j in range(127)) for i in range(8 * steps)]
args = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=8,
    report_to=[], use_cpu=True, bf16=False, disable_tqdm=True, save_strategy="no", logging_strategy="no",
    max_length=128)
trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}), processing_class=tok)
start = time.perf_counter()
trainer.train()
elapsed = time.perf_counter() - start
tokens = steps * 8 * 128
print(json.dumps({"tokens_per_s": tokens / elapsed, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(lib: str, steps: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, lib, str(steps)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    a = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"deltatune": [], "peft": []}
    for _ in range(a.rounds):
        for lib in ("deltatune", "peft"):
            results[lib].append(run(lib, a.steps))
    med = {lib: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for lib, rs in results.items()}
    for lib, m in med.items():
        print(f"{lib:10s} tokens/s {m['tokens_per_s']:9.0f}   peak RSS {m['peak_rss_mb']:7.0f} MB")
    print(
        f"tokens/s ratio (deltatune / PEFT): {med['deltatune']['tokens_per_s'] / med['peft']['tokens_per_s']:.3f}"
    )
    print(
        f"peak memory ratio (deltatune / PEFT): {med['deltatune']['peak_rss_mb'] / med['peft']['peak_rss_mb']:.3f}"
    )


if __name__ == "__main__":
    main()
