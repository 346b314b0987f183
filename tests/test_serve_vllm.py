"""The vLLM export check: each of vLLM's LoRA rules refuses the adapter that breaks it."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from deltatune.serve.vllm import check_adapter, report, vllm_command

GOOD: dict[str, Any] = {
    "peft_type": "LORA",
    "r": 16,
    "lora_alpha": 32,
    "target_modules": ["q_proj"],
    "bias": "none",
}


def folder(root: Path, name: str, **changes: Any) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({**GOOD, **changes}))
    return path


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["score"]}, "modules_to_save"),
        ({"r": 1024}, "exceeds vLLM's largest --max-lora-rank 512"),
        ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
        ({"peft_type": "IA3"}, "LoRA adapters only"),
    ],
)
def test_each_rule_refuses(tmp_path: Path, changes: dict[str, Any], problem: str) -> None:
    c = check_adapter("x", str(folder(tmp_path, "x", **changes)))
    assert not c.ok and any(problem in p for p in c.problems)


def test_command_lists_the_good_adapters_with_the_smallest_rank_bound(tmp_path: Path) -> None:
    folder(tmp_path, "sql", r=8)
    folder(tmp_path, "poem", r=20, bias="lora_only")
    folder(tmp_path, "dora", use_dora=True)
    text, code = report("HuggingFaceTB/SmolLM2-135M-Instruct", str(tmp_path))
    assert code == 1 and "REFUSED dora (r=16)" in text and "ok      sql (r=8)" in text
    cmd = shlex.split(text.splitlines()[-1])
    assert cmd[:3] == ["vllm", "serve", "HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert cmd[cmd.index("--max-lora-rank") + 1] == "32"  # r=20 needs the next allowed value
    mods = cmd[cmd.index("--lora-modules") + 1 : cmd.index("--enable-lora-bias")]
    assert mods == [f"poem={tmp_path / 'poem'}", f"sql={tmp_path / 'sql'}"]
    assert vllm_command("b", [check_adapter("d", str(tmp_path / "dora"))]) is None
