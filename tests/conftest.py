"""Fixtures shared by the tests; plain helpers (tiny models, inputs, checks) are in helpers.py."""

from __future__ import annotations

import fcntl
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

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


# -- the real generative model (SmolLM2-135M-Instruct), converted once per test run ---------------
@pytest.fixture(scope="session", autouse=True)
def deltatune_home(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Tests never touch the user's cache: DELTATUNE_HOME is a temporary folder for the run
    (subprocesses inherit it). Under pytest-xdist the workers share it (their base temporary
    folders have this run's folder as parent), so the SmolLM2 conversion is done once per run."""
    base = tmp_path_factory.getbasetemp()
    home = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "deltatune-home"
    home.mkdir(exist_ok=True)
    os.environ["DELTATUNE_HOME"] = str(home)
    return str(home)


@pytest.fixture(scope="session")
def smollm2(deltatune_home: str) -> dict[str, object]:
    """The converted SmolLM2 cache folder, plus the logits of the model read straight from the
    GGUF file during that conversion (for the reload test): ``{"path", "ids", "logits"}``. The
    worker that converts saves those logits beside the cache for the other workers."""
    pytest.importorskip("gguf")
    from deltatune import model_cache

    seen: dict[str, object] = {"ids": torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 28120, 905]])}
    logits_file = Path(deltatune_home) / "smollm2-gguf-logits.pt"
    with open(Path(deltatune_home) / ".smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one conversion; the other workers wait for it
        if logits_file.exists():
            seen["path"] = model_cache.default_lm_path(progress=False)
            seen["logits"] = torch.load(logits_file)
            return seen
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
        if "logits" not in seen:  # another process (a docs snippet, a CLI test) converted it first
            model, _ = original(model_cache.gguf_path())
            with torch.no_grad():
                seen["logits"] = model(seen["ids"]).logits
            del model
        torch.save(seen["logits"], logits_file)
    return seen


@pytest.fixture(scope="session", autouse=True)
def _docs_snippet_server() -> Iterator[None]:
    """The docs snippet runner's helper process (tests/docs_snippets.py) ends with the session."""
    yield
    import sys

    runner = sys.modules.get("docs_snippets")
    if runner is not None:
        runner.close_server()


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist's default ``--dist load``, hand tests out one at a time from the order
    below (``--maxschedchunk 1``) unless the command line says otherwise. Its default sends each
    worker a first chunk of a quarter of its share: with the long tests first, one worker got all
    of them and the other, done with short tests, waited (a third of the run's wall time)."""
    if getattr(config.option, "maxschedchunk", "absent") is None:
        config.option.maxschedchunk = 1


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long tests (marked slow) first, in file order: pytest-xdist then hands them out before the
    short ones, so no long test starts last and keeps one worker busy after the other is done.

    A test file with a ``start_in_background()`` function (a slow one-time set-up, e.g. an oracle
    venv) has it called once when any of its tests is selected, so the set-up runs beside other
    tests instead of holding a worker when its first test needs it."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if config.getoption("collectonly"):
        return
    modules = {id(m): m for m in (getattr(item, "module", None) for item in items) if m is not None}
    for module in modules.values():
        start = getattr(module, "start_in_background", None)
        if callable(start):
            start()
