"""AdapterHub bottleneck adapters: deltatune computes, loads and counts what AdapterHub does.

The reference is AdapterHub's ``adapters`` 1.3.0, which pins transformers 4.57 and so runs in a
venv of its own (``.venv-adapterhub``, made from ``requirements-adapterhub.txt`` on the first run;
``DELTATUNE_ADAPTERHUB_PYTHON`` may name an interpreter that already has it). One subprocess,
``tests/oracles/adapterhub_oracle.py``, writes every case's base model, AdapterHub-saved adapter
folder and reference outputs; they are cached by the content hash of the script and the
requirements. This file compares deltatune against them in the main venv.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModel

from deltatune import BottleneckConfig, PeftModel, get_peft_model
from deltatune.cli import inspect_adapter
from deltatune.methods.bottleneck import BottleneckLayer

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "oracles" / "adapterhub_oracle.py"
REQUIREMENTS = ROOT / "requirements-adapterhub.txt"
CACHE = Path(os.environ.get("DELTATUNE_ADAPTERHUB_CACHE", ROOT / ".venv-adapterhub"))

PRESETS = {"houlsby": "houlsby", "pfeiffer": "pfeiffer", "parallel": "parallel"}
BERT_CASES = [
    "houlsby",
    "pfeiffer",
    "parallel",
    "pfeiffer_knobs",
    "houlsby_post_add",
    "seq_no_ln_after",
    "parallel_ln",
]
DECODER_CASES = [f"{arch}_{p}" for arch in ("llama", "gpt2") for p in PRESETS]
CASES = [*BERT_CASES, "xlmr_pfeiffer", *DECODER_CASES]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # one builder at a time (pytest-xdist workers)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _oracle_python() -> str:
    given = os.environ.get("DELTATUNE_ADAPTERHUB_PYTHON")
    if given:
        return given
    venv = CACHE / "venv"
    python = venv / "bin" / "python"
    stamp = venv / f".installed-{hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:12]}"
    if stamp.exists():
        return str(python)
    shutil.rmtree(venv, ignore_errors=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        # torch first, as scripts/setup.sh does (DELTATUNE_TORCH picks another CPU build)
        [*pip, os.environ.get("DELTATUNE_TORCH", "torch==2.13.0")],
        [*pip, "-r", str(REQUIREMENTS)],
    ]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            reason = (done.stderr or done.stdout).strip().splitlines()[-3:]
            shutil.rmtree(venv, ignore_errors=True)
            pytest.skip(
                f"cannot install the AdapterHub oracle ({' '.join(cmd[:3])}...): {' | '.join(reason)}"
            )
    stamp.touch()
    return str(python)


def start_in_background() -> None:
    """Build the oracle's venv and artefacts in a thread while other tests run (conftest calls this
    when tests of this file are selected); the ``reference`` fixture then finds them built, or
    builds them itself (and reports a failure) if this did not."""

    def build() -> None:
        with contextlib.suppress(BaseException):  # pytest.skip / a failure: the fixture tells
            _build_reference()

    threading.Thread(target=build, name="adapterhub-oracle", daemon=True).start()


@pytest.fixture(scope="session")
def reference() -> Path:
    """The oracle's artefacts: <case>/{base,adapter,io.pt,params.txt}."""
    return _build_reference()


def _build_reference() -> Path:
    key = hashlib.sha256(SCRIPT.read_bytes() + REQUIREMENTS.read_bytes()).hexdigest()[:16]
    out = CACHE / "artefacts" / key
    with _locked(CACHE / ".lock"):
        if not (out / "done.json").exists():
            python = _oracle_python()
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
            done = subprocess.run(
                [python, str(SCRIPT), str(tmp)], capture_output=True, text=True, timeout=1800, env=env
            )
            assert done.returncode == 0, f"the AdapterHub oracle failed:\n{done.stderr[-3000:]}"
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
            for old in out.parent.iterdir():  # artefacts of earlier versions of the oracle
                if old != out:
                    shutil.rmtree(old, ignore_errors=True)
    return out


def _base(reference: Path, case: str) -> nn.Module:
    return AutoModel.from_pretrained(reference / case / "base", attn_implementation="eager").eval()


def _run(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def _train_run(model: nn.Module, ids: torch.Tensor, seed: int) -> torch.Tensor:
    model.train()
    torch.manual_seed(seed)  # the same dropout masks as the oracle drew, in the same order
    try:
        return _run(model, ids)
    finally:
        model.eval()


def _io(reference: Path, case: str) -> dict:
    return torch.load(reference / case / "io.pt")


@pytest.mark.parametrize("case", CASES)
def test_adapterhub_folder_loads_with_the_same_outputs_and_parameter_count(
    reference: Path, case: str
) -> None:
    io = _io(reference, case)
    base = _base(reference, case)
    torch.testing.assert_close(_run(base, io["ids"]), io["base"], rtol=0, atol=1e-5)
    model = PeftModel.from_pretrained(base, reference / case / "adapter", allow_pickle=True)
    out = _run(model, io["ids"])
    assert (io["eval"] - io["base"]).abs().max() > 0.1  # the adapter does change the outputs
    torch.testing.assert_close(out, io["eval"], rtol=0, atol=1e-5)
    n = sum(p.numel() for name, p in model.named_parameters() if ".bottleneck." in name)
    assert n == int((reference / case / "params.txt").read_text())
    assert model.get_nb_trainable_parameters()[0] == 0  # loaded for inference: frozen


@pytest.mark.parametrize("case", CASES)
def test_train_mode_outputs_agree_with_dropout(reference: Path, case: str) -> None:
    """Dropout in the block (p=0.1) and in the adapter (p=0.1), in AdapterHub's order."""
    io = _io(reference, case)
    model = PeftModel.from_pretrained(_base(reference, case), reference / case / "adapter", allow_pickle=True)
    out = _train_run(model, io["ids"], io["seed"])
    assert (io["train"] - io["eval"]).abs().max() > 0.1  # dropout was on
    torch.testing.assert_close(out, io["train"], rtol=0, atol=1e-5)


# AdapterHub's module names → deltatune's, written out here independently of the reader.
_SITES = {
    "bert": {"attention.output": "attention.output", "output": "output"},
    "llama": {"attention_adapters": "self_attn", "output_adapters": "mlp"},
    "gpt2": {"attention_adapters": "attn", "output_adapters": "mlp"},
}
_PARTS = {"adapter_down.0": "down", "adapter_up": "up"}


def _copy_adapterhub_weights(model: PeftModel, folder: Path, arch: str) -> None:
    """Put AdapterHub's saved weights into a deltatune model's adapter ``default`` by hand."""
    from safetensors.torch import load_file

    st = folder / "adapter.safetensors"
    state = load_file(st) if st.exists() else torch.load(folder / "pytorch_adapter.bin", weights_only=True)
    params = dict(model.get_base_model().named_parameters())
    for key, value in state.items():  # e.g. encoder.layer.0.attention.output.adapters.ah.adapter_up.weight
        module, _, rest = key.partition(".adapters.ah.")
        part, _, leaf = rest.rpartition(".")
        (loc, site), *_ = [(a, b) for a, b in _SITES[arch].items() if module.endswith("." + a)]
        block = module[: -len(loc) - 1]
        with torch.no_grad():
            params[f"{block}.{site}.bottleneck.default.{_PARTS[part]}.{leaf}"].copy_(value)
    assert len(state) == sum(1 for n in params if ".bottleneck.default." in n)


@pytest.mark.parametrize("case", [*PRESETS, *DECODER_CASES])
def test_deltatune_preset_with_the_same_weights_gives_adapterhub_outputs(reference: Path, case: str) -> None:
    arch, _, preset = case.rpartition("_")
    arch = arch or "bert"
    factor = 8 if arch == "bert" and preset != "parallel" else 4
    config = BottleneckConfig(placement=preset, reduction_factor=factor, dropout=0.1)
    model = get_peft_model(_base(reference, case), config)
    _copy_adapterhub_weights(model, reference / case / "adapter", arch)
    io = _io(reference, case)
    model.eval()
    torch.testing.assert_close(_run(model, io["ids"]), io["eval"], rtol=0, atol=1e-5)
    torch.testing.assert_close(_train_run(model, io["ids"], io["seed"]), io["train"], rtol=0, atol=1e-5)
    loaded = PeftModel.from_pretrained(
        _base(reference, case), reference / case / "adapter", allow_pickle=True
    )
    got = loaded.peft_config["default"]
    for field in (
        "placement",
        "non_linearity",
        "original_ln_before",
        "original_ln_after",
        "scaling",
        "ln_before",
    ):
        assert getattr(got, field) == getattr(config, field), field


def test_the_preset_aliases_are_adapterhubs_class_names() -> None:
    for alias, preset in (("double_seq_bn", "houlsby"), ("seq_bn", "pfeiffer"), ("par_bn", "parallel")):
        assert BottleneckConfig(placement=alias).to_dict() == BottleneckConfig(placement=preset).to_dict()


def test_a_pickled_folder_is_refused_unless_allowed(reference: Path) -> None:
    folder = reference / "houlsby" / "adapter"
    assert (folder / "pytorch_adapter.bin").exists()
    base = _base(reference, "houlsby")
    with pytest.raises(ValueError, match="pytorch_adapter.bin, a pickle.*allow_pickle=True"):
        PeftModel.from_pretrained(base, folder)
    assert not any(isinstance(m, BottleneckLayer) for m in base.modules())  # base untouched


def _edited_copy(reference: Path, case: str, tmp_path: Path, **changes: object) -> Path:
    folder = tmp_path / "adapter"
    shutil.copytree(reference / case / "adapter", folder)
    data = json.loads((folder / "adapter_config.json").read_text())
    data["config"].update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_gating": True}, "use_gating=True"),
        ({"phm_layer": True}, "phm_layer=True"),
        ({"inv_adapter": "nice"}, "inv_adapter='nice'"),
        ({"stochastic_depth": 0.1}, "stochastic_depth=0.1"),
        ({"cross_adapter": True}, "cross_adapter=True"),
        ({"reduction_factor": {"0": 4, "default": 8}}, "reduction_factor=.*per layer"),
        ({"mh_adapter": True, "output_adapter": False}, "mh_adapter/output_adapter/is_parallel"),
        ({"architecture": "lora"}, "architecture='lora'.*bottleneck adapters only"),
        ({"some_future_switch": 3}, "some_future_switch=3"),
    ],
)
def test_what_deltatune_cannot_compute_is_refused_naming_the_field(
    reference: Path, tmp_path: Path, changes: dict, message: str
) -> None:
    folder = _edited_copy(reference, "pfeiffer", tmp_path, **changes)
    base = _base(reference, "pfeiffer")
    ref = _run(base, _io(reference, "pfeiffer")["ids"])
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(base, folder)
    assert not any(isinstance(m, BottleneckLayer) for m in base.modules())
    torch.testing.assert_close(_run(base, _io(reference, "pfeiffer")["ids"]), ref, rtol=0, atol=0)
    info = inspect_adapter(str(folder))
    assert not info["loadable"] and info["problem"]


def test_unknown_weights_are_refused(reference: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _edited_copy(reference, "pfeiffer", tmp_path)
    state = load_file(folder / "adapter.safetensors")
    state["heads.ah.1.weight"] = torch.zeros(2, 32)
    save_file(state, folder / "adapter.safetensors")
    with pytest.raises(ValueError, match="'heads.ah.1.weight'.*not part of a bottleneck adapter"):
        PeftModel.from_pretrained(_base(reference, "pfeiffer"), folder)


def test_load_adapter_mixed_batch_merge_refusal_and_own_format(reference: Path, tmp_path: Path) -> None:
    io = _io(reference, "pfeiffer")
    ids = io["ids"]
    model = get_peft_model(
        _base(reference, "pfeiffer"), BottleneckConfig(placement="seq_bn", reduction_factor=8)
    )
    model.load_adapter(reference / "pfeiffer" / "adapter", adapter_name="ah")
    model.set_adapter("ah")  # the base is in eval mode: so is the new adapter (its dropout is off)
    torch.testing.assert_close(_run(model, ids), io["eval"], rtol=0, atol=1e-5)
    with torch.no_grad():  # one forward, each row its own adapter (or none)
        mixed = model(input_ids=ids, adapter_names=["ah", "__base__", "default"]).last_hidden_state
    torch.testing.assert_close(mixed[0], io["eval"][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], io["base"][1], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[2], io["base"][2], rtol=0, atol=1e-5)  # fresh "default": identity
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    model.save_pretrained(tmp_path, selected_adapters=["ah"])
    saved = json.loads((tmp_path / "ah" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["placement"] == "pfeiffer"
    again = PeftModel.from_pretrained(_base(reference, "pfeiffer"), tmp_path / "ah")
    torch.testing.assert_close(_run(again, ids), io["eval"], rtol=0, atol=1e-5)


def test_a_head_model_loads_an_adapter_saved_from_the_bare_model(reference: Path) -> None:
    """AdapterHub saved ``encoder.layer...`` from a BertModel; a classifier names it ``bert.encoder...``."""
    from transformers import BertForSequenceClassification

    io = _io(reference, "pfeiffer")
    clf = BertForSequenceClassification.from_pretrained(
        reference / "pfeiffer" / "base", attn_implementation="eager"
    )
    model = PeftModel.from_pretrained(clf.eval(), reference / "pfeiffer" / "adapter")
    with torch.no_grad():
        hidden = model(input_ids=io["ids"], output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(hidden, io["eval"], rtol=0, atol=1e-5)


def test_inspect_shows_an_adapterhub_folder(reference: Path) -> None:
    info = inspect_adapter(str(reference / "pfeiffer_knobs" / "adapter"))
    assert info["format"] == "adapterhub" and info["loadable"]
    assert "placement=pfeiffer" in info["method"]
    assert info["config"]["ln_before"] is True and info["config"]["leave_out"] == [0]
    info = inspect_adapter(str(reference / "llama_pfeiffer" / "adapter"))
    assert info["parameters"] == int((reference / "llama_pfeiffer" / "params.txt").read_text())


def test_a_saved_prediction_head_is_named_in_a_warning(reference: Path, tmp_path: Path) -> None:
    folder = _edited_copy(reference, "pfeiffer", tmp_path)
    (folder / "head_config.json").write_text("{}")
    with pytest.warns(UserWarning, match="prediction head.*adapter only"):
        PeftModel.from_pretrained(_base(reference, "pfeiffer"), folder)
