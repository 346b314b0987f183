"""`deltatune serve` with no model serves the bundled SmolLM2-135M-Instruct, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi")


@pytest.mark.slow
def test_serve_with_no_model_serves_smollm2(smollm2: dict[str, object], tmp_path: Path) -> None:
    store = tmp_path / "adapters"
    store.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deltatune", "serve", "--adapters", str(store), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "serving HuggingFaceTB/SmolLM2-135M-Instruct" in line, line
        url = line.rsplit(" at ", 1)[1].strip()
        with urllib.request.urlopen(url + "/models", timeout=60) as r:
            names = [m["id"] for m in json.load(r)["data"]]
        assert names == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
        body = {
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "messages": [
                {"role": "user", "content": "What is the capital of France? Answer in one sentence."}
            ],
            "max_tokens": 12,
            "temperature": 0,
        }
        req = urllib.request.Request(
            url + "/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            text = json.load(r)["choices"][0]["message"]["content"]
        assert "The capital of France is Paris" in text
    finally:
        proc.terminate()
        proc.wait(timeout=60)
