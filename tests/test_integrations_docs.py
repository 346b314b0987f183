"""Every Python snippet in docs/integrations.md runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_page_has_its_snippets() -> None:
    assert len(SNIPPETS) == 3


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index: int, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    if "trl" in SNIPPETS[index]:
        pytest.importorskip("trl")
    script = tmp_path / "snippet.py"
    script.write_text(SNIPPETS[index])
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    if index == 0:
        assert "adapter_model.safetensors" in done.stdout and "'model.safetensors'" not in done.stdout
