"""``deltatune serve``: the command-line entry of the server (its parser and its run)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any


def add_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a base model and a folder of adapters (LoRA, DoRA, (IA)³) over an OpenAI-compatible HTTP API",
        description="Serve a causal LM and every adapter folder in --adapters: the request's 'model' names "
        "the adapter (the base's name for none). Mixed-adapter batches run through the adapter bank.",
        formatter_class=fmt,
    )
    p.add_argument(
        "--model",
        default=None,
        help="base model folder (transformers format, with tokenizer); default: the bundled "
        "SmolLM2-135M-Instruct (converted once into the local cache)",
    )
    p.add_argument("--adapters", default="adapters", help="folder of adapter folders (the store)")
    p.add_argument(
        "--name",
        default=None,
        help="the base's model name in the API (default: the folder name; the Hub name for the bundled model)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=8000, help="port (0: a free one)")
    p.add_argument("--slots", type=int, default=8, help="adapters kept loaded (least recently used evicted)")
    p.add_argument("--max-rank", type=int, default=64, help="largest adapter rank served")
    p.add_argument("--max-batch", type=int, default=16, help="requests running together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting before 429")
    p.add_argument("--max-len", type=int, default=2048, help="prompt + completion tokens limit")
    p.add_argument(
        "--api-key",
        default=os.environ.get("DELTATUNE_API_KEY"),
        help="key for the /admin endpoints (default: $DELTATUNE_API_KEY; none: admin off)",
    )
    p.add_argument(
        "--engine",
        choices=["deltatune", "vllm"],
        default="deltatune",
        help="vllm: check every adapter against vLLM's LoRA rules and print the vllm serve command",
    )
    p.set_defaults(func=run)


def _base(args: argparse.Namespace) -> tuple[str, str]:
    """(folder, API name) of the base: --model, a bundled model's Hub name, or SmolLM2 by default."""
    from deltatune.assets import DEFAULT_LM_NAME, default_lm_path, resolve_model

    if args.model is None:
        return str(default_lm_path()), args.name or DEFAULT_LM_NAME
    bundled = None if os.path.isdir(args.model) else resolve_model(args.model)
    if bundled is not None:
        return str(bundled), args.name or args.model
    return args.model, args.name or os.path.basename(os.path.normpath(args.model))


def run(args: argparse.Namespace) -> int:
    folder, name = _base(args)
    if args.engine == "vllm":
        from deltatune.serve.vllm import report

        text, code = report(folder, args.adapters, args.port or 8000)
        print(text)
        return code
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.serve.bank import serving_model
    from deltatune.serve.engine import Engine
    from deltatune.serve.server import ServerThread, create_app
    from deltatune.serve.store import AdapterStore

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = serving_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())
    store = AdapterStore(model, args.adapters, capacity=args.slots, max_rank=args.max_rank, base_name=name)
    engine = Engine(model, tokenizer, store, args.max_batch, args.max_queue, args.max_len)
    engine.start()
    server = ServerThread(create_app(engine, name, api_key=args.api_key), args.host, args.port).start()
    print(
        f"serving {name} and {len(store.available())} adapters from {args.adapters} at {server.url}/v1",
        flush=True,
    )
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        done.wait()
    finally:
        server.stop()
        engine.stop()
    print("stopped", file=sys.stderr)
    return 0
