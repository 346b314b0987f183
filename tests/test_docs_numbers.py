"""The numbers the docs state are the library's own: parameter counts recomputed on meta-device
models, and the checklist page's figures read back from the data files its scripts write."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DATA = DOCS / "data"
sys.path.insert(0, str(DOCS / "scripts"))

import figures  # noqa: E402
import param_counts  # noqa: E402


@pytest.fixture(scope="module")
def counts() -> dict[str, dict[str, int]]:
    return param_counts.compute()


def page(name: str) -> str:
    """The page's text with Markdown emphasis removed and line breaks as spaces."""
    return re.sub(r"\s+", " ", (DOCS / name).read_text().replace("**", ""))


def test_the_data_file_is_what_the_script_computes(counts: dict[str, dict[str, int]]) -> None:
    assert json.loads((DATA / "param_counts.json").read_text()) == counts


def test_the_mission_corrections_hold(counts: dict[str, dict[str, int]]) -> None:
    t = {k: v["trainable"] for k, v in counts.items()}
    bert = counts["bert_base_base"]["all"]
    assert bert == 109_482_240
    # prompt tuning: 81,920 = 20 × 4096, and 512× fewer than LoRA r=16 on all seven projections
    assert t["llama3_8b_prompt_20"] == 81_920 and t["llama3_8b_lora_r16"] == 512 * t["llama3_8b_prompt_20"]
    # prefix tuning on BERT-base: 184,320 = 0.168 % (not "well under 0.1 %")
    assert t["bert_base_prefix_10"] == 184_320 and f"{100 * 184_320 / bert:.3f}" == "0.168"
    # Houlsby adapters on BERT-base, m=64: 2,379,264 = 2.17 % (not 3–4 %)
    assert t["bert_base_houlsby_m64"] == 2_379_264 == 24 * (2 * 768 * 64 + 64 + 768)
    assert f"{100 * t['bert_base_houlsby_m64'] / bert:.2f}" == "2.17"
    assert t["bert_base_pfeiffer_m64"] == 1_189_632
    # (IA)³ trains more than prompt tuning, not fewer
    assert f"{t['llama3_8b_ia3'] / t['llama3_8b_prompt_20']:.1f}" == "6.4"
    assert f"{t['bert_base_ia3'] / t['bert_base_prompt_20']:.1f}" == "4.2"
    assert t["llama3_8b_lora_r16"] == 80 * t["llama3_8b_ia3"]
    # DoRA: +1,376,256 on Llama-3-8B
    assert t["llama3_8b_dora_r16"] - t["llama3_8b_lora_r16"] == 1_376_256
    # the snippet's 83,886,080 || 8,114,245,632: r=32's trainable count, a total 98,304 off
    assert t["llama3_8b_lora_r32"] == 83_886_080
    assert 8_114_245_632 - counts["llama3_8b_lora_r32"]["all"] == 98_304


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("checklist.md", "llama3_8b_prompt_20"),
        ("checklist.md", "llama3_8b_lora_r16"),
        ("checklist.md", "bert_base_prefix_10"),
        ("checklist.md", "bert_base_houlsby_m64"),
        ("checklist.md", "llama3_8b_ia3"),
        ("checklist.md", "llama3_8b_dora_r16"),
        ("lora.md", "llama3_8b_lora_r16"),
        ("prompt-tuning.md", "llama3_8b_prompt_20"),
        ("prefix-tuning.md", "llama3_8b_prefix_10"),
        ("prefix-tuning.md", "bert_base_prefix_10"),
        ("bottleneck.md", "bert_base_houlsby_m64"),
        ("bottleneck.md", "bert_base_pfeiffer_m64"),
        ("ia3.md", "llama3_8b_ia3"),
        ("ia3.md", "bert_base_ia3"),
        ("dora.md", "llama3_8b_dora_r16"),
    ],
)
def test_pages_state_the_computed_counts(name: str, key: str, counts: dict[str, dict[str, int]]) -> None:
    assert f"{counts[key]['trainable']:,}" in page(name)


def test_checklist_states_the_corrections() -> None:
    text = page("checklist.md")
    for phrase in (
        "512× fewer",
        "0.168 %",
        "2.17 %",
        "6.4× more",
        "4.2×",
        "+1,376,256",
        "98,304 less",
        "Li et al.",
        "8,114,147,328",
        "hard prompt",
    ):
        assert phrase in text, phrase


def test_checklist_latency_table_is_the_benchmark_s_output() -> None:
    data = json.loads((DATA / "latency.json").read_text())
    assert figures.latency_markdown(data) in (DOCS / "checklist.md").read_text()


def test_checklist_compare_table_is_the_recorded_run() -> None:
    recorded = (DOCS / "training.md").read_text()
    start = recorded.index("| method | trainable params |")
    table = recorded[start : recorded.index("\n\n", start)]
    assert table.count("\n") >= 9  # header, rule, 8 methods
    assert table in (DOCS / "checklist.md").read_text()


def test_checklist_quotes_the_loss_curve_run() -> None:
    data = json.loads((DATA / "loss_curves.json").read_text())
    text = page("checklist.md")
    assert data["steps"] == 30 and "--steps 30" in text
    for method, result in data["methods"].items():
        assert result["loss"], method
        assert f"{100 * result['accuracy_after']:.1f} %" in text, method
