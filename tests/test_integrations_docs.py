"""Every Python snippet in docs/integrations.md runs as written, each in a fresh process of its own
(tests/docs_snippets.py's runner)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from docs_snippets import printed, run_page

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_page_has_its_snippets() -> None:
    assert len(SNIPPETS) == 7


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("peft")
    snippet = SNIPPETS[index]
    if "trl" in snippet:
        pytest.importorskip("trl")
    if "BitsAndBytesConfig" in snippet:
        pytest.importorskip("bitsandbytes")
    if "convert_lora_to_gguf" in snippet:
        from oracles.llama_cpp import converter_dir

        monkeypatch.setenv("LLAMA_CPP", str(converter_dir()))
    step = {"kind": "python", "code": snippet, "where": f"integrations.md, snippet {index}", "expected": None}
    failures = run_page([step], tmp_path, timeout=300)
    assert not failures, failures[0]
    stdout = printed(tmp_path)[0]
    if index == 0:
        assert "adapter_model.safetensors" in stdout and "'model.safetensors'" not in stdout
    if "get_model_status" in snippet:
        assert stdout.split()[:2] == ["4", "8"]
    if "vllm_command" in snippet:
        assert "vllm serve HuggingFaceTB/SmolLM2-135M-Instruct" in stdout
    if "convert_lora_to_gguf" in snippet:
        assert int(stdout.split()[-1]) > 10_000  # the GGUF adapter file's size
