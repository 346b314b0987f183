"""llama.cpp reads deltatune's LoRA folders: its own converter, ``convert_lora_to_gguf.py`` (from
llama-cpp-python's sdist, see ``oracles/llama_cpp.py``), turns a deltatune adapter into a GGUF
LoRA file holding the adapter's factors (bit for bit, Q's rows in llama.cpp's rotary order) and
its alpha."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import deltatune as dt
from helpers import tiny_llama

gguf = pytest.importorskip("gguf")

LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}


def _convert(converter: Path, base: Path, adapter: Path, out: Path) -> dict[str, object]:
    cmd = [sys.executable, str(converter / "convert_lora_to_gguf.py"), "--base", str(base), "--outfile", str(out), str(adapter)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reader = gguf.GGUFReader(str(out))
    fields = {
        name: reader.fields[name].contents()
        for name in ("general.type", "adapter.type", "adapter.lora.alpha")
    }
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    return {"fields": fields, "tensors": tensors}


def _rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a Q projection reordered from Hugging Face's rotary layout (halves) to llama.cpp's
    (interleaved pairs), per head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.slow
def test_llama_cpp_converts_a_deltatune_adapter(tmp_path: Path) -> None:
    from oracles.llama_cpp import converter_dir

    converter = converter_dir()
    from transformers import LlamaForCausalLM

    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    model = dt.get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"), dt.LoraConfig(**LORA))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path / "ours")

    ours = _convert(converter, tmp_path / "base", tmp_path / "ours", tmp_path / "ours.gguf")
    assert ours["fields"] == {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": 16.0}
    tensors = ours["tensors"]
    assert isinstance(tensors, dict) and len(tensors) == 8  # lora_a and lora_b of q and v in 2 layers
    state = model.get_adapter_state_dict()
    for layer in range(2):
        for proj, short in (("q_proj", "attn_q"), ("v_proj", "attn_v")):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            for factor in ("a", "b"):
                want = state[f"{prefix}.lora_{factor.upper()}.weight"].detach().numpy()
                if (short, factor) == ("attn_q", "b"):  # llama.cpp reorders Q's rows for its rotary layout
                    want = _rope_rows(want, heads=4)
                got = tensors[f"blk.{layer}.{short}.weight.lora_{factor}"]
                assert got.shape == want.shape and np.array_equal(got, want)
