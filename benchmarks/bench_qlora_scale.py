"""QLoRA at the scale it exists for: loading memory and training-step time on a 0.84 B Llama.

    python benchmarks/bench_qlora_scale.py [--layers 16] [--rounds 3] [--threads 2]
        [--sizes 1x128,1x512,4x512] [--dtypes fp32,bf16] [--cache DIR] [--skip-memory] [--skip-steps]

The model folder (hidden 2048, intermediate 5632, 16 layers, 16 heads / 4 KV heads, vocab
32000, untied head; random N(0, 0.02) weights saved as bf16 safetensors shards, 0.84 B
parameters) is built once into ``--cache`` (default ``$DELTATUNE_HOME/bench`` or
``/tmp/deltatune-bench``), never into the repository.

1. Loading memory, each setup in its own fresh process: the process's peak RSS while
   loading and its resident RSS afterwards (both above the RSS after imports), and the
   loaded model's own bytes:
   - deltatune ``load_quantized`` (streams the shards into NF4),
   - deltatune ``from_pretrained`` + ``quantize_model``,
   - transformers + bitsandbytes ``from_pretrained(quantization_config=BitsAndBytesConfig(nf4,
     double quant))``.
2. Training step (forward, backward, AdamW on LoRA r=16 / alpha 32 on all seven projections),
   in one process per dtype, setups timed round-robin in each round (median of the rounds):
   deltatune QLoRA, PEFT + bitsandbytes QLoRA and deltatune LoRA on the dense base, at
   each batch x length in ``--sizes``. fp32: everything in fp32. bf16: bf16 weights, LoRA
   in fp32, the step under ``torch.autocast("cpu", torch.bfloat16)``, bitsandbytes
   computing in bf16.

Ratios deltatune / PEFT+bitsandbytes and QLoRA / dense LoRA are printed; lower is better, by
wall clock and by the process's CPU time (on a machine shared with other jobs, the CPU time of
a one-thread run, ``--threads 1``, is the figure that survives their load).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
LAYERS_PER_SHARD = 4


def default_cache() -> str:
    home = os.environ.get("DELTATUNE_HOME")
    return os.path.join(home, "bench") if home else "/tmp/deltatune-bench"


# -- the model folder -------------------------------------------------------------------------------


def build_folder(cache: str, layers: int) -> str:
    """The Llama folder with ``layers`` layers (built once; a finished folder has its index)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = os.path.join(cache, f"llama-2048x5632-L{layers}-bf16")
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index_path):
        return folder
    os.makedirs(folder, exist_ok=True)
    cfg = LlamaConfig(num_hidden_layers=layers, dtype="bfloat16", **SHAPE)  # type: ignore[arg-type]
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)

    def shard_of(key: str) -> int:
        if ".layers." in key:
            return 1 + int(key.split(".layers.")[1].split(".")[0]) // LAYERS_PER_SHARD
        return 0

    n_shards = 1 + -(-layers // LAYERS_PER_SHARD)
    weight_map: dict[str, str] = {}
    total = 0
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        tensors = {}
        for key, shape in shapes.items():
            if shard_of(key) != s:
                continue
            if key.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            tensors[key] = t
            weight_map[key] = name
            total += t.nbytes
        save_file(tensors, os.path.join(folder, name), metadata={"format": "pt"})
        del tensors
    cfg.save_pretrained(folder)
    with open(index_path + ".tmp", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    os.replace(index_path + ".tmp", index_path)
    return folder


# -- setups -------------------------------------------------------------------------------------------


def quiet() -> None:
    import logging

    import transformers

    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def load(setup: str, folder: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if setup == "deltatune load_quantized":
        from deltatune.quant import load_quantized

        return load_quantized(folder, dtype=dtype)
    if setup == "deltatune from_pretrained + quantize_model":
        from deltatune.quant import quantize_model

        return quantize_model(AutoModelForCausalLM.from_pretrained(folder, dtype=dtype))
    if setup == "PEFT + bitsandbytes":
        from transformers import BitsAndBytesConfig

        cfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        return AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=cfg, dtype=dtype, device_map="cpu"
        )
    if setup == "deltatune LoRA (dense base)":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    raise ValueError(setup)


def with_lora(setup: str, model: torch.nn.Module) -> torch.nn.Module:
    settings = {"r": 16, "lora_alpha": 32, "target_modules": PROJECTIONS}
    torch.manual_seed(1)
    if setup.startswith("PEFT"):
        import peft

        wrapped = peft.get_peft_model(model, peft.LoraConfig(**settings))  # type: ignore[arg-type]
    else:
        import deltatune as dt

        wrapped = dt.get_peft_model(model, dt.LoraConfig(**settings))  # type: ignore[arg-type]
    with torch.no_grad():  # a trained adapter: B != 0
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    return wrapped.train()  # bitsandbytes' CPU eval path would swap in an inference kernel


def rss() -> dict[str, int]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def model_bytes(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.nbytes
    return total


def child_memory(setup: str, folder: str, threads: int) -> None:
    torch.set_num_threads(threads)
    quiet()
    import bitsandbytes  # noqa: F401  (imports before the baseline, for every setup alike)
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import deltatune.quant  # noqa: F401

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    before = rss()["VmRSS"]
    t0 = time.perf_counter()
    model = load(setup, folder, torch.bfloat16)
    seconds = time.perf_counter() - t0
    after = rss()
    print(
        json.dumps(
            {
                "before": before,
                "peak": after["VmHWM"] - before,
                "resident": after["VmRSS"] - before,
                "model": model_bytes(model),
                "seconds": seconds,
            }
        )
    )


def train_step(model: torch.nn.Module, ids: torch.Tensor, autocast: bool) -> Any:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def child_steps(
    dtype_name: str, folder: str, threads: int, sizes: list[tuple[int, int]], rounds: int
) -> None:
    torch.set_num_threads(threads)
    quiet()
    dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
    setups = ["deltatune QLoRA", "PEFT + bitsandbytes", "deltatune LoRA (dense base)"]
    loaders = {"deltatune QLoRA": "deltatune load_quantized"}
    models = {s: with_lora(s, load(loaders.get(s, s), folder, dtype)) for s in setups}
    for batch, length in sizes:
        ids = torch.randint(
            0, SHAPE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(0)
        )
        steps = {s: train_step(m, ids, autocast=dtype_name == "bf16") for s, m in models.items()}
        for fn in steps.values():  # warm-up (AdamW state, allocator)
            fn()
        samples: dict[str, list[float]] = {s: [] for s in setups}
        cpu: dict[str, list[float]] = {s: [] for s in setups}
        for _ in range(rounds):
            for s, fn in steps.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                samples[s].append(time.perf_counter() - t0)
                cpu[s].append(time.process_time() - c0)
        print(json.dumps({"size": f"{batch}x{length}", "samples": samples, "cpu": cpu}), flush=True)


# -- the parent --------------------------------------------------------------------------------------


def run_child(args: list[str]) -> list[dict[str, Any]]:
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default="1x128,1x512,4x512")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--cache", default=default_cache())
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    if args.child:
        kind, *rest = args.child
        folder = build_folder(args.cache, args.layers)
        if kind == "memory":
            child_memory(" ".join(rest), folder, args.threads)
        else:
            child_steps(rest[0], folder, args.threads, sizes, args.rounds)  # type: ignore[arg-type]
        return

    t0 = time.perf_counter()
    folder = build_folder(args.cache, args.layers)
    n_params = sum(
        v["shape"][0] * (v["shape"][1] if len(v["shape"]) > 1 else 1)
        for f in os.listdir(folder)
        if f.endswith(".safetensors")
        for v in _header(os.path.join(folder, f)).values()
    )
    print(
        f"model folder: {folder} ({n_params / 1e9:.3f} B parameters, ready in {time.perf_counter() - t0:.0f} s)"
    )
    print(
        f"torch threads per process: {args.threads}; the machine may be shared: compare ratios, not seconds"
    )
    common = ["--layers", str(args.layers), "--threads", str(args.threads), "--cache", args.cache]

    if not args.skip_memory:
        rows = []
        setups = [
            "deltatune load_quantized",
            "deltatune from_pretrained + quantize_model",
            "PEFT + bitsandbytes",
        ]
        res = {s: run_child([*common, "--child", "memory", *s.split(" ")])[0] for s in setups}
        for s in setups:
            r = res[s]
            rows.append(
                (
                    s,
                    f"{r['peak'] / 2**30:.2f}",
                    f"{r['resident'] / 2**30:.2f}",
                    f"{r['model'] / 2**30:.2f}",
                    f"{r['peak'] / r['resident']:.2f}",
                    f"{r['seconds']:.0f}",
                )
            )
        table(
            "Loading (GiB above the RSS after imports; bf16 files, dense parts kept bf16)",
            ("setup", "load peak RSS", "resident RSS", "model bytes", "peak / resident", "seconds"),
            rows,
        )
        ours, bnb = res["deltatune load_quantized"], res["PEFT + bitsandbytes"]
        print(f"load peak, deltatune / bitsandbytes: {ours['peak'] / bnb['peak']:.2f}")

    if not args.skip_steps:
        for dtype_name in args.dtypes.split(","):
            results = run_child(
                [*common, "--sizes", args.sizes, "--rounds", str(args.rounds), "--child", "steps", dtype_name]
            )
            for kind, what in (("samples", "wall clock"), ("cpu", "process CPU time")):
                rows = []
                for r in results:
                    med = {s: statistics.median(v) for s, v in r[kind].items()}
                    q, b, d = (
                        med["deltatune QLoRA"],
                        med["PEFT + bitsandbytes"],
                        med["deltatune LoRA (dense base)"],
                    )
                    rows.append(
                        (r["size"], f"{q:.2f}", f"{b:.2f}", f"{d:.2f}", f"{q / b:.2f}", f"{q / d:.2f}")
                    )
                table(
                    f"Training step, {dtype_name}, {what} (median of {args.rounds} interleaved rounds, seconds)",
                    (
                        "batch x tokens",
                        "deltatune QLoRA",
                        "PEFT+bnb QLoRA",
                        "deltatune dense LoRA",
                        "QLoRA / bnb",
                        "QLoRA / dense",
                    ),
                    rows,
                )


def _header(path: str) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {k: {"shape": list(f.get_slice(k).get_shape())} for k in f.keys()}  # noqa: SIM118


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
