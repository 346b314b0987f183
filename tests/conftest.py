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
