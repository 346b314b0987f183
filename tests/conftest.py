"""Fixtures shared by the tests; plain helpers (tiny models, inputs, checks) are in helpers.py."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from helpers import MODELS, tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
torch.set_num_threads(1)  # pytest-xdist runs one worker per core


@pytest.fixture(params=sorted(MODELS))
def model_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def base4() -> nn.Module:
    """The tiny Llama with its linear layers (not the head) in deltatune's 4-bit NF4."""
    from deltatune.quant import quantize_model

    return quantize_model(tiny_llama())


@pytest.fixture
def no_dynamo() -> Iterator[None]:
    """bitsandbytes torch.compile's its CPU fallback paths: slow to compile and irrelevant to a test
    of values, so run them eagerly."""
    with torch.compiler.set_stance("force_eager"):
        yield


@pytest.fixture(scope="session")
def bnb_saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], nn.Module]:
    """A tiny Llama saved to disk, and a loader that quantises it with transformers + bitsandbytes on CPU."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama")
    # Widths of at least 64: bitsandbytes' CPU 4-bit inference kernel fails on rows shorter than a block.
    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(path)

    def load(bits: int) -> nn.Module:
        cfg = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
            if bits == 4
            else BitsAndBytesConfig(load_in_8bit=True)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model = LlamaForCausalLM.from_pretrained(path, quantization_config=cfg, device_map="cpu")
            except Exception as exc:  # pragma: no cover - depends on the machine
                pytest.skip(f"bitsandbytes quantisation does not run here: {exc}")
        # Train mode (no dropout in these models): bitsandbytes' CPU *eval* path switches 4-bit layers to a
        # bf16 kernel, which would make every comparison with a dense fp32 reference approximate.
        return model.train()

    return load


# -- the real generative model (SmolLM2-135M-Instruct), converted once per test session -----------
@pytest.fixture(scope="session", autouse=True)
def deltatune_home(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Tests never touch the user's cache: DELTATUNE_HOME is a temporary folder for the session
    (subprocesses inherit it)."""
    home = str(tmp_path_factory.mktemp("deltatune-home"))
    os.environ["DELTATUNE_HOME"] = home
    return home


@pytest.fixture(scope="session")
def smollm2(deltatune_home: str) -> dict[str, object]:
    """The converted SmolLM2 cache folder, plus the logits of the model read straight from the
    GGUF file during that conversion (for the reload test): ``{"path", "ids", "logits"}``."""
    pytest.importorskip("gguf")
    from deltatune import model_cache

    seen: dict[str, object] = {"ids": torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 28120, 905]])}
    original = model_cache.dequantise

    def recording(path):  # type: ignore[no-untyped-def]
        model, tokenizer = original(path)
        with torch.no_grad():
            seen["logits"] = model(seen["ids"]).logits
        return model, tokenizer

    model_cache.dequantise = recording
    try:
        seen["path"] = model_cache.default_lm_path(progress=False)
    finally:
        model_cache.dequantise = original
    return seen
