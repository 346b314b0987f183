"""Every Python snippet in docs/integrations.md runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_page_has_its_snippets() -> None:
    assert len(SNIPPETS) == 7


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index: int, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    snippet = SNIPPETS[index]
    env = dict(os.environ)
    if "trl" in snippet:
        pytest.importorskip("trl")
    if "BitsAndBytesConfig" in snippet:
        pytest.importorskip("bitsandbytes")
    if "convert_lora_to_gguf" in snippet:
        from oracles.llama_cpp import converter_dir

        env["LLAMA_CPP"] = str(converter_dir())
    script = tmp_path / "snippet.py"
    script.write_text(snippet)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    if index == 0:
        assert "adapter_model.safetensors" in done.stdout and "'model.safetensors'" not in done.stdout
    if "get_model_status" in snippet:
        assert done.stdout.split()[:2] == ["4", "8"]
    if "vllm_command" in snippet:
        assert "vllm serve HuggingFaceTB/SmolLM2-135M-Instruct" in done.stdout
    if "convert_lora_to_gguf" in snippet:
        assert int(done.stdout.split()[-1]) > 10_000  # the GGUF adapter file's size
