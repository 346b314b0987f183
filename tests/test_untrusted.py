"""Hostile adapter folders: each is refused with a clear error, quickly, and the base model is
bit-identical afterwards (the model passed to ``from_pretrained`` and a ``PeftModel`` that
``load_adapter`` was called on alike).

The corpus starts from one good LoRA adapter of a tiny Llama and breaks it one way per case:
base-weight keys, catastrophic regexes, huge sizes, wrong dtypes, non-finite values, malformed
JSON, deep nesting, symlinks out of the folder, devices and pipes, pickles.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltatune import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from deltatune.io import CONFIG_NAME, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME
from deltatune.methods.base import AdapterLayer
from train_utils import tiny_llama_lm

SECONDS = 10.0  # every refusal well within this on a busy machine (a ReDoS would take hours)
PREFIX = "base_model.model.model.layers.0.self_attn."
MARKER = "deltatune-pickle-ran"


def _config(folder: Path) -> dict:
    return json.loads((folder / CONFIG_NAME).read_text())


def _edit_config(folder: Path, **changes: object) -> None:
    (folder / CONFIG_NAME).write_text(json.dumps({**_config(folder), **changes}))


def _edit_weights(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    state = load_file(str(folder / WEIGHTS_NAME))
    change(state)
    save_file(state, str(folder / WEIGHTS_NAME))


def _raw_safetensors(folder: Path, header: dict, body: bytes = b"") -> None:
    text = json.dumps(header).encode()
    (folder / WEIGHTS_NAME).write_bytes(struct.pack("<Q", len(text)) + text + body)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def _pickle_only(folder: Path) -> None:
    (folder / WEIGHTS_NAME).unlink()
    (folder / PICKLE_WEIGHTS_NAME).write_bytes(pickle.dumps({"x": _Evil()}))


def _symlink_config_out(folder: Path) -> None:
    outside = folder.parent / "outside.json"
    outside.write_text((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).unlink()
    (folder / CONFIG_NAME).symlink_to(outside)


def _symlink_weights(target: str) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        (folder / WEIGHTS_NAME).unlink()
        (folder / WEIGHTS_NAME).symlink_to(target)

    return make


def _fifo_weights(folder: Path) -> None:
    (folder / WEIGHTS_NAME).unlink()
    os.mkfifo(folder / WEIGHTS_NAME)


def _set(key: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    return lambda f: _edit_weights(f, lambda s: s.__setitem__(PREFIX + key, value(s[PREFIX + key])))


def _add(key: str, tensor: torch.Tensor) -> Callable[[Path], None]:
    return lambda f: _edit_weights(f, lambda s: s.__setitem__(key, tensor))


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[0, 0] = float("nan")
    return t


def _inf(t: torch.Tensor) -> torch.Tensor:
    return t * float("inf")


CATASTROPHIC = r"(([a-z_0-9.]+)*)*\.never"  # Python's re: ~6 s on 16 characters, x2 per character more

# case id → (how the good folder is broken, error type, what the message must say)
CORPUS: dict[str, tuple[Callable[[Path], None], type[BaseException], str]] = {
    # base weights: an adapter may not replace the base model's own weights
    "base_layer_weight": (
        _add(PREFIX + "q_proj.base_layer.weight", torch.zeros(32, 32)),
        ValueError,
        "not an embedding table",
    ),
    "plain_base_weight": (
        _add("base_model.model.model.norm.weight", torch.zeros(32)),
        ValueError,
        "name weights of the base model",
    ),
    # regexes that backtrack for hours in Python's re, or that need backtracking to run at all
    "redos_target_modules": (
        lambda f: _edit_config(f, target_modules=CATASTROPHIC),
        ValueError,
        "matched no",
    ),
    "lookahead_target_modules": (
        lambda f: _edit_config(f, target_modules=r"(?=(a+)+$).*q_proj"),
        ValueError,
        "linear-time engine",
    ),
    "backreference_rank_pattern": (
        lambda f: _edit_config(f, rank_pattern={r"(q)_\1proj": 8}),
        ValueError,
        "back-references",
    ),
    "huge_pattern": (lambda f: _edit_config(f, target_modules="a" * 200_000), ValueError, "longer than"),
    # sizes: bounded, and checked against the file before anything is allocated
    "huge_r": (lambda f: _edit_config(f, r=10**9), ValueError, r"r=1000000000"),
    "huge_rank_pattern": (
        lambda f: _edit_config(f, rank_pattern={"q_proj": 10**12}),
        ValueError,
        r"rank_pattern\['q_proj'\]",
    ),
    "r_disagrees_with_file": (lambda f: _edit_config(f, r=100_000), ValueError, "Nothing was allocated"),
    "rank_pattern_disagrees": (
        lambda f: _edit_config(f, rank_pattern={"q_proj": 50_000}),
        ValueError,
        "Nothing was allocated",
    ),
    "sizes_the_file_does_not_fill": (
        lambda f: _edit_config(
            f,
            target_modules=["q_proj", "v_proj", "o_proj", "up_proj"],
            rank_pattern={"o_proj": 131_072, "up_proj": 131_072},
        ),
        ValueError,
        "new parameters but the file holds",
    ),
    "negative_r": (lambda f: _edit_config(f, r=-4), ValueError, "r=-4"),
    "absurd_alpha": (lambda f: _edit_config(f, lora_alpha=1e308), ValueError, "lora_alpha=1e\\+308"),
    "nan_in_config": (
        lambda f: (f / CONFIG_NAME).write_text(
            (f / CONFIG_NAME).read_text().replace('"lora_dropout": 0.0', '"lora_dropout": NaN')
        ),
        ValueError,
        "NaN or Infinity",
    ),
    # tensors: floating point and finite only
    "int_tensor": (
        _set("q_proj.lora_A.weight", lambda t: t.to(torch.int32)),
        ValueError,
        "not floating point",
    ),
    "bool_tensor": (_set("q_proj.lora_B.weight", lambda t: t > 0), ValueError, "not floating point"),
    "complex_tensor": (
        _set("q_proj.lora_A.weight", lambda t: t.to(torch.complex64)),
        ValueError,
        "not floating",
    ),
    "nan_weights": (_set("q_proj.lora_B.weight", _nan), ValueError, "NaN or infinite"),
    "inf_weights": (_set("q_proj.lora_A.weight", _inf), ValueError, "NaN or infinite"),
    # safetensors headers that lie
    "header_size_lie": (
        lambda f: (f / WEIGHTS_NAME).write_bytes(struct.pack("<Q", 2**40) + b"{}"),
        ValueError,
        "corrupt or truncated",
    ),
    "offsets_past_end": (
        lambda f: _raw_safetensors(
            f,
            {
                PREFIX + "q_proj.lora_A.weight": {
                    "dtype": "F32",
                    "shape": [10**6, 10**6],
                    "data_offsets": [0, 4 * 10**12],
                }
            },
        ),
        ValueError,
        "corrupt or truncated",
    ),
    "truncated_weights": (
        lambda f: (f / WEIGHTS_NAME).write_bytes((f / WEIGHTS_NAME).read_bytes()[:-100]),
        ValueError,
        "corrupt or truncated",
    ),
    # configs that are not configs
    "malformed_json": (
        lambda f: (f / CONFIG_NAME).write_text('{"peft_type": "LORA", '),
        ValueError,
        "not valid JSON",
    ),
    "not_utf8": (
        lambda f: (f / CONFIG_NAME).write_bytes(b'{"peft_type": "\xff\xfe"}'),
        ValueError,
        "not UTF-8",
    ),
    "json_list": (lambda f: (f / CONFIG_NAME).write_text("[1, 2]"), ValueError, "JSON list"),
    "json_null": (lambda f: (f / CONFIG_NAME).write_text("null"), ValueError, "JSON NoneType"),
    "deep_nesting": (
        lambda f: (f / CONFIG_NAME).write_text(
            '{"peft_type": "LORA", "x": ' + "[" * 200_000 + "]" * 200_000 + "}"
        ),
        ValueError,
        "nested",
    ),
    "huge_config": (
        lambda f: (f / CONFIG_NAME).write_text(json.dumps({**_config(f), "pad": "x" * (20 * 2**20)})),
        ValueError,
        "bytes, over the",
    ),
    "unknown_method": (lambda f: _edit_config(f, peft_type="EVIL"), ValueError, "Unknown PEFT method"),
    # files that are not files of the folder
    "config_symlink_out": (_symlink_config_out, ValueError, "outside the adapter folder"),
    "weights_symlink_dev_zero": (_symlink_weights("/dev/zero"), ValueError, "outside the adapter folder"),
    "weights_symlink_passwd": (_symlink_weights("/etc/passwd"), ValueError, "outside the adapter folder"),
    "weights_fifo": (_fifo_weights, ValueError, "not a regular file"),
    "weights_folder": (
        lambda f: ((f / WEIGHTS_NAME).unlink(), (f / WEIGHTS_NAME).mkdir()),
        ValueError,
        "not a regular file",
    ),
    # pickles: refused unless asked for (and then loaded without running code)
    "pickle_only": (_pickle_only, ValueError, "pickle file, which can run code"),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good") / "adapter"
    model = get_peft_model(
        tiny_llama_lm(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.save_pretrained(str(folder))
    return folder


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_identical(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before), "the base model's structure changed"
    for k, v in before.items():
        assert torch.equal(after[k], v) and after[k].dtype == v.dtype, f"{k} changed"
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


@pytest.mark.parametrize("case", list(CORPUS))
def test_hostile_folder_is_refused_quickly_and_changes_nothing(case, good, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the pickle's payload would leave its marker
    break_it, error, message = CORPUS[case]
    folder = tmp_path / "adapter"
    shutil.copytree(good, folder)
    break_it(folder)
    base = tiny_llama_lm()
    before = _snapshot(base)
    start = time.perf_counter()
    with pytest.raises(error, match=message), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PeftModel.from_pretrained(base, str(folder))
    assert time.perf_counter() - start < SECONDS
    _assert_identical(base, before)
    assert not (tmp_path / MARKER).exists()


@pytest.mark.parametrize(
    "case", ["base_layer_weight", "redos_target_modules", "r_disagrees_with_file", "nan_weights"]
)
def test_load_adapter_refusal_leaves_the_model_as_it_was(case, good, tmp_path):
    break_it, error, message = CORPUS[case]
    folder = tmp_path / "adapter"
    shutil.copytree(good, folder)
    break_it(folder)
    host = PeftModel.from_pretrained(tiny_llama_lm(), str(good))
    before = _snapshot(host)
    x = torch.randint(1, 100, (1, 6))
    with torch.no_grad():
        out = host(input_ids=x).logits
    with pytest.raises(error, match=message):
        host.load_adapter(str(folder), "hostile")
    assert list(host.peft_config) == ["default"]
    after = host.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(host(input_ids=x).logits, out)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_is_never_run_even_when_allowed(good, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "adapter"
    shutil.copytree(good, folder)
    _pickle_only(folder)
    with pytest.raises(ValueError, match="weights_only=True"):
        PeftModel.from_pretrained(tiny_llama_lm(), str(folder), allow_pickle=True)
    assert not (tmp_path / MARKER).exists()


def test_catastrophic_patterns_run_in_linear_time(good, tmp_path):
    """A pattern that backtracks for hours in Python's re is matched against every module in
    milliseconds, as target_modules and as rank_pattern / alpha_pattern keys (where it matches
    nothing, so the adapter loads with its plain r and alpha)."""
    folder = tmp_path / "adapter"
    shutil.copytree(good, folder)
    _edit_config(folder, rank_pattern={CATASTROPHIC: 8}, alpha_pattern={CATASTROPHIC: 99.0})
    start = time.perf_counter()
    model = PeftModel.from_pretrained(tiny_llama_lm(), str(folder))
    assert time.perf_counter() - start < SECONDS
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.r["default"] == 4 and layer.scaling["default"] == 8 / 4


def test_embedding_table_from_the_file_is_still_taken_alone(tmp_path):
    """PEFT saves a targeted embedding's whole table (after a vocabulary resize): accepted."""
    model = get_peft_model(tiny_llama_lm(), LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    model.save_pretrained(str(tmp_path))
    table = tiny_llama_lm().model.embed_tokens.weight.detach() + 1.0
    _edit_weights(
        tmp_path, lambda s: s.__setitem__("base_model.model.model.embed_tokens.base_layer.weight", table)
    )
    loaded = PeftModel.from_pretrained(tiny_llama_lm(), str(tmp_path))
    assert torch.equal(loaded.get_base_model().model.embed_tokens.base_layer.weight, table)


def test_prompt_tuning_sizes_are_checked_before_allocating(tmp_path):
    model = get_peft_model(tiny_llama_lm(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model.save_pretrained(str(tmp_path))
    base = tiny_llama_lm()
    before = _snapshot(base)
    _edit_config(tmp_path, num_virtual_tokens=10**9)
    with pytest.raises(ValueError, match="num_virtual_tokens=1000000000"):
        PeftModel.from_pretrained(base, str(tmp_path))
    _edit_config(tmp_path, num_virtual_tokens=100_000)
    with pytest.raises(ValueError, match="Nothing was allocated"):
        PeftModel.from_pretrained(base, str(tmp_path))
    _assert_identical(base, before)


def test_unknown_keys_are_echoed_short(good, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(good, folder)
    _edit_config(folder, **{"k" * 1_000_000: 1, **{f"extra_{i}": 1 for i in range(100)}})
    with pytest.warns(UserWarning, match="ignoring config keys") as record:
        PeftModel.from_pretrained(tiny_llama_lm(), str(folder))
    text = " ".join(str(w.message) for w in record)
    assert len(text) < 5_000 and "more" in text


def test_a_hugging_face_cache_snapshot_may_link_into_its_blobs(good, tmp_path):
    """The Hub cache keeps files in ``blobs/`` and links them from ``snapshots/<rev>/``: allowed."""
    repo = tmp_path / "models--me--adapter"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        shutil.copy(good / name, repo / "blobs" / name)
        (snap / name).symlink_to(Path("..", "..", "blobs", name))
    PeftModel.from_pretrained(tiny_llama_lm(), str(snap))


@pytest.mark.parametrize(
    "case", ["config_symlink_out", "weights_fifo", "deep_nesting", "not_utf8", "huge_config"]
)
def test_reading_only_the_config_is_guarded_too(case, good, tmp_path):
    """``PeftConfig.from_pretrained`` (what ``deltatune merge`` / ``inspect`` read first) reads the
    config with the same rules: no link out, bounded size and depth, UTF-8."""
    from deltatune import PeftConfig

    folder = tmp_path / "adapter"
    shutil.copytree(good, folder)
    if case == "weights_fifo":  # a pipe as the config: must not block
        (folder / CONFIG_NAME).unlink()
        os.mkfifo(folder / CONFIG_NAME)
        message = "not a regular file"
    else:
        CORPUS[case][0](folder)
        message = CORPUS[case][2]
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        PeftConfig.from_pretrained(str(folder))
    assert time.perf_counter() - start < SECONDS


def test_a_loaded_prompt_never_reads_the_tokenizer_path_of_its_config(tmp_path, monkeypatch):
    """A prompt-tuning config initialised from text names a tokenizer path; when the adapter is
    loaded (even to train on), the file's prompt replaces that init, so the path is never read."""
    import transformers

    model = get_peft_model(tiny_llama_lm(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.fill_(0.5)
    model.save_pretrained(str(tmp_path))
    _edit_config(
        tmp_path,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="hello",
        tokenizer_name_or_path="/etc/evil",
    )

    def refuse(*args, **kwargs):
        raise AssertionError(f"a path from the adapter file was read: {args}")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    loaded = PeftModel.from_pretrained(tiny_llama_lm(), str(tmp_path), is_trainable=True)
    assert torch.all(loaded.prompt_encoder["default"].embedding.weight == 0.5)
    host = PeftModel.from_pretrained(tiny_llama_lm(), str(tmp_path))
    host.load_adapter(str(tmp_path), "again", is_trainable=True)


def test_a_catastrophic_pattern_on_a_mixture_of_experts_model_is_fast():
    """On MoE models, target_modules is also matched against expert parameter names (to map old
    per-expert names onto fused parameters): that matching is linear-time too."""
    from helpers import tiny_mixtral

    base = tiny_mixtral()
    before = _snapshot(base)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="matched no"):
        get_peft_model(base, LoraConfig(target_modules=CATASTROPHIC))
    assert time.perf_counter() - start < SECONDS
    _assert_identical(base, before)
