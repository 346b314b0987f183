"""AdapterHub side of bench_bottleneck_adapterhub.py; runs in the AdapterHub venv (transformers 4.57).

argv: BASE_DIR OUT_DIR THREADS. Builds one AdapterHub model per preset on the saved base model,
with random non-zero adapter weights, saves each adapter to OUT_DIR/<preset> and its output to
OUT_DIR/<preset>.pt, prints "ready", then answers each stdin line "<preset>" (or "base") with
the seconds one forward pass takes.
"""

from __future__ import annotations

import os
import sys
import time

import adapters
import torch
from adapters import DoubleSeqBnConfig, ParBnConfig, SeqBnConfig
from transformers import BertModel

PRESETS = {"houlsby": DoubleSeqBnConfig, "pfeiffer": SeqBnConfig, "parallel": ParBnConfig}


def main(base_dir: str, out: str, threads: int) -> None:
    torch.set_num_threads(threads)
    os.makedirs(out, exist_ok=True)
    ids = torch.load(os.path.join(base_dir, "ids.pt"))
    models = {"base": BertModel.from_pretrained(base_dir, attn_implementation="eager").eval()}
    for name, cls in PRESETS.items():
        model = BertModel.from_pretrained(base_dir, attn_implementation="eager").eval()
        adapters.init(model)
        model.add_adapter(name, config=cls(reduction_factor=12 if name != "parallel" else 3))
        torch.manual_seed(1)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if ".adapters." in pname:
                    p.normal_(std=0.02)
        model.set_active_adapters(name)
        model.eval()
        model.save_adapter(os.path.join(out, name), name)
        with torch.no_grad():
            torch.save(model(input_ids=ids).last_hidden_state, os.path.join(out, f"{name}.pt"))
        models[name] = model
    print("ready", flush=True)
    for line in sys.stdin:
        model = models[line.strip()]
        with torch.no_grad():
            start = time.perf_counter()
            model(input_ids=ids)
            print(time.perf_counter() - start, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
