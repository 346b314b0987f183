"""`deltatune serve` as a process: it serves, survives kill -9 and restart, and --engine vllm prints the command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from deltatune import LoraConfig, get_peft_model
from deltatune.cli import main
from helpers import randomize_lora

pytest.importorskip("fastapi")
from helpers import base_model, char_tokenizer  # noqa: E402


def start(model: Path, store: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deltatune",
            "serve",
            "--model",
            str(model),
            "--adapters",
            str(store),
            "--port",
            "0",
            "--name",
            "tiny",
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    return proc, line.rsplit(" at ", 1)[1].strip()


def complete(url: str, model: str) -> str:
    body = json.dumps({"model": model, "prompt": "hi", "max_tokens": 8, "temperature": 0}).encode()
    req = urllib.request.Request(
        url + "/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return str(json.load(r)["choices"][0]["text"])


@pytest.mark.slow
def test_serve_process_survives_kill_9(tmp_path: Path) -> None:
    model_dir, store = tmp_path / "base", tmp_path / "store"
    base_model().save_pretrained(str(model_dir))
    char_tokenizer().save_pretrained(str(model_dir))
    peft = get_peft_model(
        base_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    randomize_lora(peft, std=0.3)
    peft.save_pretrained(str(store / "sql"))
    before = sorted((p.name, p.stat().st_size) for p in (store / "sql").iterdir())
    proc, url = start(model_dir, store)
    try:
        first = complete(url, "sql")
        assert first != complete(url, "tiny")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert sorted((p.name, p.stat().st_size) for p in (store / "sql").iterdir()) == before
    proc, url = start(model_dir, store)
    try:
        with urllib.request.urlopen(url + "/models", timeout=30) as r:
            assert [m["id"] for m in json.load(r)["data"]] == ["tiny", "sql"]
        assert complete(url, "sql") == first
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_engine_vllm_prints_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]})
    )
    code = main(["serve", "--model", "org/base", "--adapters", str(tmp_path), "--engine", "vllm"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[-1] == (
        f"vllm serve org/base --port 8000 --enable-lora --max-lora-rank 8 --max-loras 1 --lora-modules a={tmp_path / 'a'}"
    )
