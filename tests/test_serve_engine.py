"""The continuous-batching engine: joining requests prefill as one padded batch, the running
batch's keys and values stay in place between steps, rows leave at different times, and every
greedy response is token for token the adapter's own generate alone."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from deltatune import IA3Config, LoraConfig, PeftModel, get_peft_model
from deltatune.serve import AdapterStore, serving_model
from deltatune.serve.engine import Engine, GenRequest
from deltatune.serve.kv import BatchKV
from helpers import base_model, char_tokenizer, randomize_lora

SPECS: dict[str, Any] = {
    "sql": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "chat": LoraConfig(r=2, lora_alpha=2, target_modules="all-linear", init_lora_weights=False),
    "dora": LoraConfig(r=4, target_modules=["o_proj", "up_proj"], use_dora=True, init_lora_weights=False),
    "ia3": IA3Config(init_ia3_weights=False),
}


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    for i, (name, cfg) in enumerate(SPECS.items()):
        torch.manual_seed(i)
        model = get_peft_model(base_model(), cfg)
        randomize_lora(model, std=0.3, seed=i)
        model.save_pretrained(str(root / name))
    return root


def alone(store_dir: Path, adapter: str, prompt: str, n: int) -> str:
    m: torch.nn.Module = base_model()
    if adapter != "__base__":
        m = PeftModel.from_pretrained(m, str(store_dir / adapter))
    ids = char_tokenizer()(prompt)["input_ids"]
    with torch.no_grad():
        out = m.eval().generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                eos_token_id=2, pad_token_id=0)  # fmt: skip
    return str(char_tokenizer().decode(out[0, len(ids) :], skip_special_tokens=True))


class Collector:
    def __init__(self) -> None:
        self.text: dict[int, str] = {}
        self.done = threading.Event()
        self.finished = 0
        self.expected = 0
        self.lock = threading.Lock()

    def request(self, i: int, adapter: str, prompt: str, n: int, on_token: Any = None) -> GenRequest:
        self.expected += 1
        self.text[i] = ""
        tokens = [0]

        def emit(event: tuple[str, Any]) -> None:
            kind, value = event
            if kind == "text":
                self.text[i] += value
                tokens[0] += 1
                if on_token is not None:
                    on_token(tokens[0])
            elif kind == "error":
                raise AssertionError(value)
            elif kind == "done":
                with self.lock:
                    self.finished += 1
                    if self.finished == self.expected:
                        self.done.set()

        ids = char_tokenizer()(prompt)["input_ids"]
        return GenRequest(adapter=adapter, prompt_ids=ids, max_tokens=n, temperature=0, emit=emit)


def test_batched_prefill_and_joins_equal_each_request_alone(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = serving_model(base_model())
    store = AdapterStore(model, store_dir, capacity=4, max_rank=8)
    engine = Engine(model, char_tokenizer(), store, max_batch=6, max_queue=16, max_len=120)
    prefills: list[int] = []
    real_prefill = engine._prefill
    monkeypatch.setattr(
        engine, "_prefill", lambda joined: (prefills.append(len(joined)), real_prefill(joined))
    )
    col = Collector()
    # prompts of different lengths (padding), several adapters and none, rows ending at different
    # steps (4 to 70 tokens: the cache grows past its first 64 columns)
    jobs = [
        ("sql", "SELECT * FROM t", 9),
        ("__base__", "hi", 4),
        ("dora", "Once upon a time there", 70),
        ("ia3", "abc", 12),
        ("chat", "The weather today is", 20),
    ]
    late = ("ia3", "a much longer prompt than the others", 8)  # joins while the batch runs
    late2 = ("sql", "x", 6)

    def join(count: int) -> None:
        if count == 6:
            engine.submit(col.request(5, *late))
            engine.submit(col.request(6, *late2))

    for i, job in enumerate(jobs):
        engine.submit(col.request(i, *job, on_token=join if i == 2 else None))
    engine.start()
    try:
        assert col.done.wait(120), "the engine did not finish"
    finally:
        engine.stop()
    assert prefills[0] == len(jobs) and 2 in prefills[1:]  # joining requests prefill as one batch
    for i, (adapter, prompt, n) in enumerate([*jobs, late, late2]):
        assert col.text[i] == alone(store_dir, adapter, prompt, n), (adapter, prompt)
    assert engine.running == [] and engine.kv.n == 0 and engine.kv.keys == []  # idle: memory freed


def test_batch_kv_rows_move_and_grow() -> None:
    kv = BatchKV(rows=3, columns=4)
    layer = torch.arange(2 * 1 * 5 * 2, dtype=torch.float32).view(2, 1, 5, 2)  # k=2, P=5, left-padded
    kv.append([(layer, -layer)], [5, 2])
    assert kv.lengths == [5, 2] and kv.columns >= 6  # grown to hold a new token after 5
    torch.testing.assert_close(kv.keys[0][1, :, :2], layer[1, :, 3:])  # row 1: its last 2 columns
    cache = kv.cache(2)
    new = torch.full((2, 1, 1, 2), 100.0)
    keys, values = cache.layers[0].update(new, -new)
    assert keys.shape == (2, 1, 6, 2)
    assert keys[0, 0, 5].tolist() == [100.0, 100.0] and keys[1, 0, 2].tolist() == [100.0, 100.0]
    mask = kv.decode_mask(2, torch.float32)[:, 0, 0]
    assert (mask[0] == 0).all() and (mask[1, :3] == 0).all() and (mask[1, 3:] < -1e30).all()
    kv.advance(2)
    kv.remove(0)  # the last row takes row 0's place
    assert kv.lengths == [3]
    torch.testing.assert_close(kv.keys[0][0, :, :3], torch.cat([layer[1, :, 3:], new[1, :, :]], dim=1))


def test_cancelled_request_leaves_and_a_failed_step_is_contained(store_dir: Path) -> None:
    """A client gone mid-way frees its row (the others finish unchanged); a step that raises
    fails only the requests it ran, and the engine serves the next request correctly."""
    model = serving_model(base_model())
    store = AdapterStore(model, store_dir, capacity=4, max_rank=8)
    engine = Engine(model, char_tokenizer(), store, max_batch=4, max_queue=8, max_len=120)
    col = Collector()
    gone: list[GenRequest] = []

    def cancel(count: int) -> None:
        if count == 2:
            gone[0].cancelled = True

    jobs = [("sql", "SELECT", 10), ("chat", "hello", 30), ("__base__", "abc", 8)]
    reqs = [col.request(i, *job, on_token=cancel if i == 1 else None) for i, job in enumerate(jobs)]
    gone.append(reqs[1])
    col.expected -= 1  # the cancelled one never finishes
    for r in reqs:
        engine.submit(r)
    engine.start()
    try:
        assert col.done.wait(120)
        for i in (0, 2):
            assert col.text[i] == alone(store_dir, *jobs[i]), jobs[i]
        assert len(col.text[1]) < 30 and engine.kv.n == 0  # stopped early; its row is free
        # A step that raises: its request gets an error, the engine survives.
        errors: list[Any] = []
        real = engine.model.forward
        engine.model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore[method-assign]
        done = threading.Event()

        def on_error(event: tuple[str, Any]) -> None:
            if event[0] == "error":
                errors.append(event[1])
                done.set()

        engine.submit(
            GenRequest(adapter="sql", prompt_ids=[40, 41], max_tokens=4, temperature=0, emit=on_error)
        )
        assert done.wait(60) and errors[0][0] == 500 and "boom" in errors[0][1]
        engine.model.forward = real  # type: ignore[method-assign]
        col2 = Collector()
        engine.submit(col2.request(0, "ia3", "after", 6))
        assert col2.done.wait(60)
        assert col2.text[0] == alone(store_dir, "ia3", "after", 6)
        assert engine.kv.n == 0 and engine.running == []
    finally:
        engine.stop()


def test_gpt2_base_batches_too(tmp_path: Path) -> None:
    """Another architecture (GPT-2: Conv1D projections, learned positions) through the batched
    prefill and the in-place cache."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2() -> torch.nn.Module:
        torch.manual_seed(0)
        return GPT2LMHeadModel(
            GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=128)
        ).eval()

    lora = get_peft_model(
        gpt2(), LoraConfig(r=4, target_modules=["c_attn", "c_proj"], init_lora_weights=False)
    )
    randomize_lora(lora, std=0.3)
    lora.save_pretrained(str(tmp_path / "g"))
    model = serving_model(gpt2(), target_modules=["c_attn", "c_proj", "c_fc"])
    engine = Engine(
        model, char_tokenizer(), AdapterStore(model, tmp_path, capacity=2, max_rank=4), max_batch=4
    )
    col = Collector()
    jobs = [("g", "hello world", 12), ("__base__", "abc", 10), ("g", "x", 15)]
    for i, job in enumerate(jobs):
        engine.submit(col.request(i, *job))
    engine.start()
    try:
        assert col.done.wait(120)
    finally:
        engine.stop()
    tok = char_tokenizer()
    for i, (adapter, prompt, n) in enumerate(jobs):
        m = (
            gpt2()
            if adapter == "__base__"
            else PeftModel.from_pretrained(gpt2(), str(tmp_path / adapter)).eval()
        )
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            out = m.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             eos_token_id=2, pad_token_id=0)  # fmt: skip
        assert col.text[i] == tok.decode(out[0, len(ids) :], skip_special_tokens=True), adapter


def test_incremental_decoding_equals_decoding_the_whole_output() -> None:
    """The engine decodes only each request's newest tokens; with a byte-level BPE tokenizer
    (multi-byte characters split over tokens, leading spaces) the streamed text is always a prefix
    of the whole output's decoding, never shows a broken character, and ends equal to it."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the cat sat on the mat", "naïve café", "hello world"] * 20
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    text = "the café sat 😀 on a naïve mat, ünïcödé ✓ world"
    ids = fast(text)["input_ids"]
    assert fast.decode(ids) == text and len(ids) > 20
    engine = SimpleNamespace(tokenizer=fast)
    r = GenRequest(adapter="__base__", prompt_ids=[1])
    for n in range(1, len(ids) + 1):
        so_far = Engine._detokenize(engine, r, ids[:n], final=n == len(ids))  # type: ignore[arg-type]
        assert "\ufffd" not in so_far and text.startswith(so_far), (n, so_far)
    assert so_far == text
