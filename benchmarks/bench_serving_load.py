"""Load test of `deltatune serve` on loopback: N concurrent clients over M adapters.

Every response (greedy) is checked against the same request sent alone; printed per setting:
requests, errors, mismatches, p50/p95 latency, p50 time to first token (streamed), and
generated tokens/s. Targets: throughput with 32 adapters ≥ 0.8 × with one adapter (16 clients);
16 concurrent clients ≥ 4 × one client's throughput.

Model: Llama-shaped, random weights (hidden 256, 4 layers, vocab 100, a character tokenizer),
r=8 LoRA on all seven projections per adapter; fp32 CPU. Bounded: a few hundred requests.

Settings run in interleaved rounds (each round: every setting once); the best round of each
(by wall-clock throughput, and separately by CPU-time throughput) is printed, with errors and
mismatches summed over all rounds. Also printed: tokens per CPU-second of the server process
(engine and HTTP server; the clients run in another process), a ratio that a busy machine
disturbs less than wall-clock throughput; and the same ratios for the engine alone (requests
submitted in-process, no HTTP), which separate the scheduler from the server.

Run: python benchmarks/bench_serving_load.py [--requests 48] [--tokens 16] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from common import LLAMA_PROJECTIONS, print_table  # noqa: E402
from deltatune import LoraConfig, get_peft_model  # noqa: E402
from deltatune.serve import AdapterStore, serving_model  # noqa: E402
from deltatune.serve.engine import Engine, GenRequest  # noqa: E402
from deltatune.serve.server import ServerThread, create_app  # noqa: E402
from test_serve_server import char_tokenizer  # noqa: E402

PROMPTS = ["hello there", "SELECT name FROM", "Once upon a", "def f(x):", "The weather", "1, 2, 3,"]


def build_base() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=100, max_position_embeddings=256)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def make_store(root: str, count: int) -> None:
    model = get_peft_model(build_base(), LoraConfig(r=8, target_modules=LLAMA_PROJECTIONS))
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * (0.05 if "lora_B" in name else 0.1))
        model.save_pretrained(os.path.join(root, f"a{i}"))


def stream_request(url: str, model: str, prompt: str, tokens: int) -> tuple[str, float, float]:
    """(text, seconds to first token, total seconds) of one streamed greedy completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    start = time.perf_counter()
    first = None
    text = ""
    with urllib.request.urlopen(req, timeout=300) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            piece = chunk["choices"][0]["text"]
            if piece and first is None:
                first = time.perf_counter() - start
            text += piece
    total = time.perf_counter() - start
    return text, first if first is not None else total, total


def load(
    url: str, clients: int, adapters: int, requests: int, tokens: int, refs: dict[Any, str]
) -> tuple[str, ...]:
    jobs = [(f"a{i % adapters}", PROMPTS[i % len(PROMPTS)]) for i in range(requests)]
    errors = mismatches = 0
    lat: list[float] = []
    ttft: list[float] = []
    chars = 0
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futs = {pool.submit(stream_request, url, m, p, tokens): (m, p) for m, p in jobs}
        for fut in concurrent.futures.as_completed(futs):
            try:
                text, first, total = fut.result()
            except Exception:
                errors += 1
                continue
            key = futs[fut]
            if key not in refs:
                refs[key] = stream_request(url, key[0], key[1], tokens)[0]
            mismatches += text != refs[key]
            lat.append(total)
            ttft.append(first)
            chars += len(text)
    wall = time.perf_counter() - start
    tok_s = requests * tokens / wall  # each request generates max_tokens (no eos in this vocabulary use)
    q = statistics.quantiles(lat, n=20) if len(lat) > 1 else [lat[0]] * 19
    return (str(clients), str(adapters), str(requests), str(errors), str(mismatches),
            f"{statistics.median(lat):.2f}", f"{q[18]:.2f}", f"{statistics.median(ttft):.2f}", f"{tok_s:.1f}")  # fmt: skip


def engine_load(
    engine: Engine, clients: int, adapters: int, requests: int, tokens: int
) -> tuple[float, float]:
    """Generated tokens per second and per CPU-second of the engine alone (no HTTP): ``clients``
    requests in flight, each finished one replaced by the next, as the HTTP clients do."""
    tok = engine.tokenizer
    jobs = iter([(f"a{i % adapters}", PROMPTS[i % len(PROMPTS)]) for i in range(requests)])
    lock = threading.Lock()
    finished = threading.Semaphore(0)

    def submit_next() -> None:
        with lock:
            job = next(jobs, None)
        if job is None:
            return

        def emit(event: tuple[str, Any]) -> None:
            if event[0] in ("done", "error"):
                finished.release()
                submit_next()

        ids = tok(job[1])["input_ids"]
        engine.submit(GenRequest(adapter=job[0], prompt_ids=ids, max_tokens=tokens, temperature=0, emit=emit))

    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(clients):
        submit_next()
    for _ in range(requests):
        finished.acquire()
    made = requests * tokens
    return made / (time.perf_counter() - start), made / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        make_store(root, 32)
        model = serving_model(build_base())
        store = AdapterStore(model, root, capacity=32, max_rank=8, base_name="bench")
        engine = Engine(model, char_tokenizer(), store, max_batch=16, max_queue=256, max_len=256)
        engine.start()
        server = ServerThread(create_app(engine, "bench")).start()
        refs: dict[Any, str] = {}
        for m in [f"a{i}" for i in range(32)]:  # references: each request alone, one at a time
            for p in PROMPTS:
                refs[(m, p)] = stream_request(server.url, m, p, args.tokens)[0]
        best: dict[tuple[int, int], tuple[str, ...]] = {}
        bad: dict[tuple[int, int], list[int]] = {}  # errors, mismatches over all rounds
        engine_best: dict[tuple[int, int], tuple[float, float]] = {}  # engine alone: tokens/s, /CPU-s
        settings = [(1, 1), (16, 1), (16, 32)]
        # The clients run in another process, as real clients would: their HTTP work does not
        # compete with the server's threads for this process's interpreter lock.
        spawn = multiprocessing.get_context("spawn")
        clients_pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn)
        try:
            # Interleaved rounds: each round runs every setting once, so a slow spell of the shared
            # machine hits all settings alike; the round with the highest throughput is kept.
            for _ in range(args.rounds):
                for clients, adapters in settings:
                    n = max(clients * 2, args.requests if clients > 1 else args.requests // 4)
                    cpu = time.process_time()  # this process: the engine and the server, not the clients
                    job = clients_pool.submit(load, server.url, clients, adapters, n, args.tokens, refs)
                    row = job.result()
                    row = (*row, f"{n * args.tokens / (time.process_time() - cpu):.1f}")
                    print(" ".join(row), flush=True)
                    key = (clients, adapters)
                    totals = bad.setdefault(key, [0, 0])
                    totals[0] += int(row[3])
                    totals[1] += int(row[4])
                    wall, cpu = engine_load(engine, clients, adapters, n, args.tokens)
                    before = engine_best.get(key, (0.0, 0.0))
                    engine_best[key] = (max(before[0], wall), max(before[1], cpu))
                    if key not in best:
                        best[key] = row
                    if float(row[-2]) > float(best[key][-2]):  # the best wall-clock round
                        best[key] = (*row[:-1], best[key][-1])
                    if float(row[-1]) > float(best[key][-1]):  # the best CPU-time round
                        best[key] = (*best[key][:-1], row[-1])
        finally:
            clients_pool.shutdown()
            server.stop()
            engine.stop()
        rows = [(*best[k][:3], str(bad[k][0]), str(bad[k][1]), *best[k][5:]) for k in settings]
    header = (
        "clients",
        "adapters",
        "requests",
        "errors",
        "mismatches",
        "p50 s",
        "p95 s",
        "ttft p50 s",
        "tokens/s",
        "tokens/CPU-s",
    )
    print_table(f"deltatune serve load test, {args.threads} thread(s), loopback", rows, header)
    t1, t16, t16m = (float(r[-2]) for r in rows)
    c1, c16, c16m = (float(r[-1]) for r in rows)
    print(f"\n16 clients / 1 client throughput: {t16 / t1:.2f} (target >= 4)")
    print(f"32 adapters / 1 adapter throughput (16 clients): {t16m / t16:.2f} (target >= 0.8)")
    print(
        f"per CPU-second of the server process (robust to a shared machine): {c16 / c1:.2f} and {c16m / c16:.2f}"
    )
    for col, clock in enumerate(["second", "CPU-second"]):
        e1, e16, e16m = (engine_best[k][col] for k in settings)
        print(f"engine alone, no HTTP, tokens per {clock} ({e1:.0f}, {e16:.0f}, {e16m:.0f}): "
              f"{e16 / e1:.2f} and {e16m / e16:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
