"""Bottleneck adapter inference latency: deltatune vs AdapterHub (``adapters`` 1.3.0), same weights.

Model: BERT-shaped with random weights (hidden 768, 4 layers, 12 heads, intermediate 3072), fp32
on CPU, eval mode, no_grad, one forward over batch 8 x 128 tokens, m = 64 (parallel: 256, its
preset's reduction factor 3 here). AdapterHub pins transformers 4.57, so it runs in its own venv
(``benchmarks/adapterhub_worker.py`` in the oracle venv that tests/test_adapterhub.py creates,
or ``DELTATUNE_ADAPTERHUB_PYTHON``): the two processes take turns, one forward each per round,
and the fastest of the rounds is kept, so a slow spell of a shared machine hits both alike. The
AdapterHub adapters are loaded into deltatune from their saved folders and the outputs compared
before timing.

Run: python benchmarks/bench_bottleneck_adapterhub.py [--rounds N] [--threads K]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ["houlsby", "pfeiffer", "parallel"]


def _oracle_python() -> str | None:
    given = os.environ.get("DELTATUNE_ADAPTERHUB_PYTHON")
    cache = Path(os.environ.get("DELTATUNE_ADAPTERHUB_CACHE", ROOT / ".venv-adapterhub"))
    for candidate in (given, str(cache / "venv" / "bin" / "python")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    python = _oracle_python()
    if python is None:
        print("No AdapterHub venv: run `pytest tests/test_adapterhub.py` once (it creates .venv-adapterhub),")
        print("or set DELTATUNE_ADAPTERHUB_PYTHON to a Python that has adapters==1.3.0.")
        return
    from transformers import BertConfig, BertModel

    import deltatune

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base_dir, out = os.path.join(tmp, "base"), os.path.join(tmp, "adapters")
        torch.manual_seed(0)
        cfg = BertConfig(hidden_size=768, num_hidden_layers=4, num_attention_heads=12, intermediate_size=3072)
        BertModel(cfg).save_pretrained(base_dir)
        ids = torch.randint(0, cfg.vocab_size, (8, 128), generator=torch.Generator().manual_seed(1))
        torch.save(ids, os.path.join(base_dir, "ids.pt"))
        env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
        worker = subprocess.Popen(
            [python, str(Path(__file__).with_name("adapterhub_worker.py")), base_dir, out, str(args.threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert worker.stdin is not None and worker.stdout is not None
            line = worker.stdout.readline()
            assert line.strip() == "ready", f"the AdapterHub worker failed ({line!r})"
            ours = {"base": BertModel.from_pretrained(base_dir, attn_implementation="eager").eval()}
            diffs = {}
            for name in PRESETS:
                base = BertModel.from_pretrained(base_dir, attn_implementation="eager").eval()
                ours[name] = deltatune.PeftModel.from_pretrained(
                    base, os.path.join(out, name), allow_pickle=True
                )
                with torch.no_grad():
                    got = ours[name](input_ids=ids).last_hidden_state
                diffs[name] = (got - torch.load(os.path.join(out, f"{name}.pt"))).abs().max().item()

            def ask(name: str) -> float:
                worker.stdin.write(name + "\n")  # type: ignore[union-attr]
                worker.stdin.flush()  # type: ignore[union-attr]
                return float(worker.stdout.readline())  # type: ignore[union-attr]

            def run(name: str) -> float:
                with torch.no_grad():
                    start = time.perf_counter()
                    ours[name](input_ids=ids)
                    return time.perf_counter() - start

            names = ["base", *PRESETS]
            times: dict[tuple[str, str], list[float]] = {}
            for r in range(args.rounds + 1):
                for name in names:
                    a, b = run(name), ask(name)
                    if r:  # round 0 warms up
                        times.setdefault(("deltatune", name), []).append(a)
                        times.setdefault(("adapterhub", name), []).append(b)
        finally:
            if worker.stdin:
                worker.stdin.close()
            worker.wait(timeout=60)
    best = {k: min(v) for k, v in times.items()}
    rows = []
    for name in names:
        dt, ah = best[("deltatune", name)], best[("adapterhub", name)]
        rows.append(
            (
                name,
                f"{dt * 1000:.1f}",
                f"{ah * 1000:.1f}",
                f"{dt / ah:.2f}x",
                f"{dt / best[('deltatune', 'base')]:.2f}x",
                f"{diffs[name]:.1e}" if name in diffs else "-",
            )
        )
    print_table(
        f"BERT 768x4, batch 8x128, fp32, {args.threads} thread(s), fastest of {args.rounds} rounds",
        rows,
        ("adapter", "deltatune ms", "AdapterHub ms", "deltatune/AH", "vs own base", "max |out diff|"),
    )


if __name__ == "__main__":
    main()
