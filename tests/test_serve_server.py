"""`deltatune serve`'s HTTP API through the official openai client, on loopback."""

from __future__ import annotations

import concurrent.futures
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.serve import AdapterStore, serving_model
from deltatune.serve.engine import Engine
from deltatune.serve.server import ServerThread, create_app
from helpers import base_model, char_tokenizer, randomize_lora

openai = pytest.importorskip("openai")

BASE = "tiny-llama"
KEY = "s3cret"
SPECS: dict[str, dict[str, Any]] = {
    "sql": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "poem": dict(r=8, lora_alpha=4, target_modules=["o_proj", "down_proj"], use_rslora=True),
    "chat": dict(r=2, lora_alpha=2, target_modules="all-linear"),
}


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    for i, (name, cfg) in enumerate(SPECS.items()):
        model = get_peft_model(base_model(), LoraConfig(init_lora_weights=False, **cfg))
        randomize_lora(model, std=0.3, seed=i)
        model.save_pretrained(str(root / name))
    return root


@pytest.fixture(scope="module")
def server(store_dir: Path) -> Iterator[tuple[ServerThread, Engine]]:
    model = serving_model(base_model())
    store = AdapterStore(model, store_dir, capacity=2, max_rank=8, base_name=BASE)
    engine = Engine(model, char_tokenizer(), store, max_batch=8, max_queue=32, max_len=96)
    engine.start()
    srv = ServerThread(create_app(engine, BASE, api_key=KEY)).start()
    yield srv, engine
    srv.stop()
    engine.stop()


@pytest.fixture
def client(server: tuple[ServerThread, Engine]) -> Any:
    return openai.OpenAI(base_url=server[0].url + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(store_dir: Path, model: str, prompt_ids: list[int], n: int) -> str:
    """Greedy text of the adapter alone through deltatune's own generate."""
    m: torch.nn.Module = base_model()
    if model != BASE:
        m = PeftModel.from_pretrained(m, str(store_dir / model))
    with torch.no_grad():
        out = m.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                         eos_token_id=2, pad_token_id=0)  # fmt: skip
    return char_tokenizer().decode(out[0, len(prompt_ids) :], skip_special_tokens=True)


def test_models_lists_base_and_adapters(client: Any) -> None:
    assert [m.id for m in client.models.list().data] == [BASE, "chat", "poem", "sql"]


def test_concurrent_greedy_completions_equal_each_adapter_alone(client: Any, store_dir: Path) -> None:
    jobs = [(m, p) for p in ("hello", "SELECT * FROM", "a") for m in (BASE, "sql", "poem", "chat")]

    def ask(job: tuple[str, str]) -> str:
        r = client.completions.create(model=job[0], prompt=job[1], max_tokens=12, temperature=0)
        assert r.model == job[0] and r.usage.prompt_tokens == len(job[1])
        return r.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(ask, jobs))
    tok = char_tokenizer()
    expected = [reference(store_dir, m, tok(p)["input_ids"], 12) for m, p in jobs]
    assert texts == expected
    assert len(set(texts)) > 4  # adapters really differ from each other and from the base


def test_chat_stream_equals_non_stream(client: Any, store_dir: Path) -> None:
    msgs = [{"role": "user", "content": "Say hi"}]
    full = client.chat.completions.create(model="poem", messages=msgs, max_tokens=10, temperature=0)
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="poem", messages=msgs, max_tokens=10, temperature=0, stream=True
        )
    ]
    assert full.choices[0].message.role == "assistant"
    assert "".join(pieces) == full.choices[0].message.content
    ids = char_tokenizer().apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert full.choices[0].message.content == reference(store_dir, "poem", list(ids), 10)


def test_stop_and_seeded_sampling(client: Any) -> None:
    first = client.completions.create(model="sql", prompt="x", max_tokens=12, temperature=0)
    text = first.choices[0].text
    if len(text) > 3:
        cut = client.completions.create(
            model="sql", prompt="x", max_tokens=12, temperature=0, stop=[text[2:4]]
        )
        assert cut.choices[0].text == text[: text.find(text[2:4])] and cut.choices[0].finish_reason == "stop"
    a = client.completions.create(model="chat", prompt="x", max_tokens=8, temperature=1.5, seed=7)
    b = client.completions.create(model="chat", prompt="x", max_tokens=8, temperature=1.5, seed=7)
    assert a.choices[0].text == b.choices[0].text


def test_errors_are_openai_style(client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert nf.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):  # path traversal is just an unknown model
        client.completions.create(model="../store", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="sql", prompt="x", max_tokens="many")  # type: ignore[arg-type]
    assert bad.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model="sql", prompt="y" * 95, max_tokens=5)
    assert "limit of 96 tokens" in long.value.body["message"]


def post(url: str, body: dict[str, Any], key: str | None = None) -> tuple[int, dict[str, Any], Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.load(e), e.headers


def test_admin_needs_the_key_and_load_unload_work(server: tuple[ServerThread, Engine], client: Any) -> None:
    srv, engine = server
    assert post(srv.url + "/admin/load", {"model": "chat"})[0] == 401
    assert post(srv.url + "/admin/load", {"model": "chat"}, key="wrong")[0] == 401
    status, body, _ = post(srv.url + "/admin/load", {"model": "chat"}, key=KEY)
    assert status == 200 and "chat" in body["loaded"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # unload while requests for it run
        futs = [pool.submit(client.completions.create, model="chat", prompt="q", max_tokens=20, temperature=0)
                for _ in range(3)]  # fmt: skip
        status, body, _ = post(srv.url + "/admin/unload", {"model": "chat"}, key=KEY)
        texts = {f.result().choices[0].text for f in futs}
    assert status == 200 and len(texts) == 1
    assert post(srv.url + "/admin/load", {"model": "../etc"}, key=KEY)[0] == 404


def test_full_queue_answers_429_with_retry_after(server: tuple[ServerThread, Engine]) -> None:
    srv, engine = server
    engine.max_queue = 0
    try:
        status, body, headers = post(srv.url + "/v1/completions", {"model": BASE, "prompt": "x"})
    finally:
        engine.max_queue = 32
    assert status == 429 and headers["Retry-After"] == "1" and body["error"]["type"] == "rate_limit_error"


def test_metrics_and_health(server: tuple[ServerThread, Engine]) -> None:
    srv, _ = server
    with urllib.request.urlopen(srv.url + "/metrics") as r:
        text = r.read().decode()
    assert "deltatune_queue_length 0" in text and "deltatune_adapter_evictions_total" in text
    with urllib.request.urlopen(srv.url + "/health") as r:
        assert json.load(r) == {"status": "ok"}
