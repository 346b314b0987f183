"""``deltatune compare``: every available method, same model, data, steps and seed, one table.

Each method trains in its own fresh process (``multiprocessing`` spawn), so one method's
memory or in-place model changes (QLoRA quantises the base) never leak into the next, and
the peak-memory column is that process's own peak (resident set on CPU, allocated memory on
CUDA). Columns:

- trainable parameters (count and % of all, 4-bit weights at their logical size)
- held-out accuracy (classification) or loss (language modelling) after training
- training time relative to LoRA: seconds per training step, measured after the runs in one
  process holding every method's model, in interleaved rounds (every method takes a short
  turn in each round), so a load swing on the machine hits all methods alike; the column
  is the median of the per-round ratios, with their range
- peak memory of the run
- inference latency overhead vs the base model on the held-out batches, with the adapter
  merged where the method allows it (timed alternately, base then method, per batch)
- adapter file size (for full fine-tuning: the whole model's weights)
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
import traceback
from typing import Any

import torch

from deltatune.train.methods import available_methods


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss * (1 if sys.platform == "darwin" else 1024))  # Linux reports KiB


def _folder_bytes(path: str) -> int:
    total = 0
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            total += os.path.getsize(os.path.join(path, name))
    return total


@torch.no_grad()
def _latency(model: Any, base: Any, batches: list[dict[str, torch.Tensor]]) -> float:
    """Relative overhead of ``model`` over ``base``: sum of times / sum of base times - 1."""
    for b in batches[:2]:  # warm-up
        model(**b)
        base(**b)
    t_model = t_base = 0.0
    for b in batches:
        t0 = time.perf_counter()
        base(**b)
        t1 = time.perf_counter()
        model(**b)
        t2 = time.perf_counter()
        t_base += t1 - t0
        t_model += t2 - t1
    return t_model / max(t_base, 1e-12) - 1.0


def run_one(opts: Any, latency_batches: int) -> dict[str, Any]:
    """Train one method and measure it (runs inside the worker process)."""
    from deltatune.train.run import load_model, run

    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = run(opts, log=lambda *a, **k: None)
    device = next(result.model.parameters()).device
    model = result.model.eval()
    merged = False
    merge = getattr(model, "merge_adapter", None)
    if callable(merge):
        try:
            merge()
            merged = True
        except Exception:  # methods that cannot merge (bottleneck, prompt, prefix, 4-bit) run unmerged
            merged = False
    else:
        merged = True  # full fine-tuning: the model is already a plain model
    latency = float("nan")
    if result.eval_examples and result.collator is not None:
        base, _ = load_model(opts, getattr(model.config, "num_labels", None), result.label_names)
        base = base.to(device).eval()
        bs = opts.eval_batch_size
        ex = result.eval_examples
        batches = [
            {k: v.to(device) for k, v in result.collator(ex[i : i + bs]).items() if k != "labels"}
            for i in range(0, len(ex), bs)
        ][:latency_batches]
        latency = _latency(model, base, batches)
    out_dir = os.path.join(opts.output_dir, "adapter" if hasattr(model, "peft_config") else "model")
    after = result.after
    return {
        "method": opts.method,
        "trainable": result.trainable_params,
        "total": result.total_params,
        "accuracy": after.get("accuracy"),
        "eval_loss": after.get("eval_loss"),
        "accuracy_before": result.before.get("accuracy"),
        "train_seconds": result.train.seconds,
        "steps": result.train.steps,
        "peak_memory": _peak_memory_bytes(device),
        "latency_overhead": latency,
        "merged": merged,
        "file_bytes": _folder_bytes(out_dir),
    }


def _worker(opts: Any, latency_batches: int, queue: Any) -> None:
    try:
        queue.put(("ok", run_one(opts, latency_batches)))
    except Exception as exc:  # report, the parent prints it and goes on with the next method
        queue.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"))


def time_steps(opts: Any, methods: list[str], rounds: int = 5, steps: int = 2) -> dict[str, list[float]]:
    """Seconds per training step (forward, backward, AdamW step) of each method, one list
    entry per round. Every method's model lives in this one process; each round gives every
    method a turn of ``steps`` steps on the same batches, starting with a different method each
    round, so a load swing on the machine hits all methods alike. A method that fails here is
    left out."""
    from deltatune.train import distributed as dist_utils
    from deltatune.train.data import Collator, check_labels, encode
    from deltatune.train.methods import get_method
    from deltatune.train.run import _AUTO, data_spec, load_model, load_run_data, method_options

    device = torch.device(opts.device) if opts.device else dist_utils.default_device()
    data = load_run_data(opts)
    names, num_labels = data.label_names, None
    if opts.task == "seq_cls":
        num_labels = len(names) if names else check_labels(data.train + data.evals, opts.label_column)[0]
        names = names or check_labels(data.train + data.evals, opts.label_column)[1]
    n = opts.batch_size
    batches: list[dict[str, torch.Tensor]] = []
    extra = {"use_cache": False} if opts.task == "causal_lm" else {}
    models: dict[str, tuple[Any, torch.optim.Optimizer]] = {}
    for name in methods:
        one = dataclasses.replace(opts, method=name)
        try:
            model, tok = load_model(one, num_labels, names)
            if not batches:
                examples, _ = encode(data.train[: n * steps], tok, data_spec(one, names))
                collate = Collator(tok.pad_token_id, opts.task)
                batches = [
                    {k: v.to(device) for k, v in collate(examples[i : i + n]).items()}
                    for i in range(0, len(examples), n)
                ]
            torch.manual_seed(opts.seed)
            model = get_method(name).build(model, _AUTO[opts.task][1], method_options(one)).to(device).train()
            params = [p for p in model.parameters() if p.requires_grad]
            models[name] = (model, torch.optim.AdamW(params, lr=1e-8))
        except Exception:  # noqa: S112 - the row keeps its loop wall clock instead
            continue

    def turn(model: Any, optimizer: torch.optim.Optimizer) -> float:
        t0 = time.perf_counter()
        for batch in batches:
            model(**batch, **extra).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) / max(1, len(batches))

    for pair in models.values():  # warm-up
        turn(*pair)
    times: dict[str, list[float]] = {name: [] for name in models}
    order = list(models)
    for r in range(rounds):
        k = r % max(1, len(order))
        for name in order[k:] + order[:k]:
            times[name].append(turn(*models[name]))
    return times


def step_time_ratios(
    times: dict[str, list[float]], reference: str = "lora"
) -> dict[str, tuple[float, float, float]]:
    """(median, lowest, highest) over rounds of each method's step time / the reference's."""
    ref = times.get(reference)
    if not ref:
        return {}
    out = {}
    for name, values in times.items():
        ratios = [v / max(r, 1e-12) for v, r in zip(values, ref)]
        if ratios:
            out[name] = (statistics.median(ratios), min(ratios), max(ratios))
    return out


def _timing_worker(opts: Any, methods: list[str], rounds: int, queue: Any) -> None:
    try:
        queue.put(("ok", time_steps(opts, methods, rounds)))
    except Exception as exc:
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def _result(proc: Any, queue: Any) -> tuple[str, Any]:
    """The worker's (status, payload); ("error", ...) when it died without one (e.g. killed for memory)."""
    import queue as queue_module

    while True:
        try:
            result: tuple[str, Any] = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                try:  # it may have put its result just before ending
                    result = queue.get(timeout=1.0)
                    break
                except queue_module.Empty:
                    result = ("error", f"its process ended without a result (exit code {proc.exitcode})")
                    break
    proc.join()
    return result


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def table(rows: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table."""
    lora = next((r for r in rows if r["method"] == "lora"), None)
    quality = "held-out accuracy" if any(r.get("accuracy") is not None for r in rows) else "held-out loss"
    head = ["method", "trainable params", "trainable %", quality, "train time vs LoRA", "peak memory",
            "latency vs base", "adapter file"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        q = f"{r['accuracy']:.1%}" if r.get("accuracy") is not None else f"{r['eval_loss']:.4f}"
        if r.get("step_time_ratio"):
            med, lo, hi = r["step_time_ratio"]
            ratio = f"{med:.2f}x ({lo:.2f}-{hi:.2f})"
        else:  # not timed in rounds: the training loops' wall clocks, one after the other
            ratio = f"{r['train_seconds'] / lora['train_seconds']:.2f}x*" if lora else "n/a"
        lat = r["latency_overhead"]
        lat_s = "n/a" if lat != lat else f"{lat:+.0%}" + ("" if r["merged"] else " (unmerged)")
        lines.append(
            "| " + " | ".join([
                r["method"], f"{r['trainable']:,d}", f"{100 * r['trainable'] / r['total']:.3f}%", q, ratio,
                _fmt_bytes(r["peak_memory"]), lat_s, _fmt_bytes(r["file_bytes"]),
            ]) + " |"
        )  # fmt: skip
    return "\n".join(lines)


def chart(rows: list[dict[str, Any]], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [r["method"] for r in rows]
    lora = next((r for r in rows if r["method"] == "lora"), rows[0])
    panels = [
        ("trainable parameters (%)", [100 * r["trainable"] / r["total"] for r in rows], True),
        (
            "held-out accuracy" if rows[0].get("accuracy") is not None else "held-out loss",
            [r["accuracy"] if r.get("accuracy") is not None else r["eval_loss"] for r in rows],
            False,
        ),
        (
            "train time vs LoRA",
            [
                r["step_time_ratio"][0]
                if r.get("step_time_ratio")
                else r["train_seconds"] / lora["train_seconds"]
                for r in rows
            ],
            False,
        ),
        ("adapter file (MiB)", [r["file_bytes"] / 2**20 for r in rows], True),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (title, values, log) in zip(axes, panels):
        ax.bar(names, values, color=[f"C{i}" for i in range(len(names))])
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def compare(
    opts: Any,
    methods: list[str] | None = None,
    output: str | None = None,
    latency_batches: int = 20,
    log: Any = print,
    timing_rounds: int = 5,
) -> list[dict[str, Any]]:
    """Train each method (default: all whose code is present) and write compare.md / .json / .png."""
    avail = available_methods()
    chosen = methods or list(avail)
    unknown = [m for m in chosen if m not in avail]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(avail)}.")
    if "lora" in chosen:  # LoRA first: it is the reference for the time column
        chosen = ["lora"] + [m for m in chosen if m != "lora"]
    root = opts.output_dir if opts.output_dir != "runs/deltatune" else "runs/compare"
    os.makedirs(root, exist_ok=True)
    rows: list[dict[str, Any]] = []
    ctx = mp.get_context("spawn")
    for name in chosen:
        if avail[name] is not None:
            log(f"skip {name}: not in this build ({avail[name]})")
            continue
        log(f"training {name} ...", flush=True)
        one = dataclasses.replace(
            opts,
            method=name,
            output_dir=os.path.join(root, name),
            quiet=True,
            log_every=10**9,
            overwrite=True,  # compare's own per-method folders: a new comparison replaces them
        )
        queue = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(one, latency_batches, queue))
        proc.start()
        status, payload = _result(proc, queue)
        if status != "ok":
            log(f"skip {name}: it failed: {payload}")
            continue
        rows.append(payload)
        q = (
            f"accuracy {payload['accuracy']:.1%}"
            if payload["accuracy"] is not None
            else f"loss {payload['eval_loss']:.4f}"
        )
        log(f"  {name}: {q}, {payload['train_seconds']:.0f}s")
    if not rows:
        raise SystemExit("No method could be trained; see the messages above.")
    timing = ""
    if timing_rounds > 0 and any(r["method"] == "lora" for r in rows):
        log(f"timing training steps: {timing_rounds} interleaved rounds ...", flush=True)
        queue = ctx.Queue()
        proc = ctx.Process(
            target=_timing_worker, args=(opts, [r["method"] for r in rows], timing_rounds, queue)
        )
        proc.start()
        status, payload = _result(proc, queue)
        if status == "ok":
            ratios = step_time_ratios(payload)
            for r in rows:
                if r["method"] in ratios:
                    r["step_time_ratio"] = list(ratios[r["method"]])
                    r["step_seconds"] = statistics.median(payload[r["method"]])
            timing = (
                f" Train time vs LoRA: seconds per training step, median (range) over {timing_rounds} "
                "interleaved rounds in one process."
            )
        else:
            log(f"step timing failed ({payload}); the time column uses the training loops' wall clocks")
    if any(not r.get("step_time_ratio") for r in rows):
        timing += " *: wall clock of the training loop, runs one after another (sensitive to machine load)."
    md = table(rows)
    header = (
        f"Model: {opts.model or 'all-MiniLM-L6-v2 (bundled)'}; data: {opts.train_file or 'embedded fortunes dataset'}; "
        f"{rows[0]['steps']} steps, batch {opts.batch_size}, seed {opts.seed}."
    )
    if rows[0].get("accuracy_before") is not None:
        header += f" Accuracy before training (fresh head): {rows[0]['accuracy_before']:.1%}."
    header += timing
    text = header + "\n\n" + md + "\n"
    out = output or os.path.join(root, "compare.md")
    with open(out, "w", encoding="utf-8") as fh:
        fh.write(text)
    with open(os.path.join(root, "compare.json"), "w", encoding="utf-8") as fh:
        json.dump(rows, fh, indent=2)
    drew = chart(rows, os.path.join(root, "compare.png"))
    log("\n" + text)
    log(
        f"written: {out}, {os.path.join(root, 'compare.json')}"
        + (f", {os.path.join(root, 'compare.png')}" if drew else "")
    )
    return rows
