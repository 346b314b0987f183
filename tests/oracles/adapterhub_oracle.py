"""Reference artefacts from AdapterHub's ``adapters`` (run in its own venv, see requirements-adapterhub.txt).

Usage: python adapterhub_oracle.py OUT_DIR

For each case it writes OUT_DIR/<case>/ with
  base/            the tiny base model (transformers save_pretrained), shared by both sides
  adapter/         the adapter folder as AdapterHub's save_adapter writes it
  io.pt            input ids and reference outputs: eval, train (with dropout, seeded), base
  params.txt       the adapter's parameter count as AdapterHub reports it
This script only uses AdapterHub's public API; it never imports deltatune.
"""

from __future__ import annotations

import json
import os
import sys

import adapters
import torch
from adapters import DoubleSeqBnConfig, ParBnConfig, SeqBnConfig
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaModel,
    XLMRobertaConfig,
    XLMRobertaModel,
)

SEED_TRAIN = 1234

CASES: dict[str, dict] = {
    # The three presets as AdapterHub defines them (only the size changed to keep it tiny).
    "houlsby": {"cls": "DoubleSeqBnConfig", "kw": {"reduction_factor": 8}},
    "pfeiffer": {"cls": "SeqBnConfig", "kw": {"reduction_factor": 8}},
    "parallel": {"cls": "ParBnConfig", "kw": {"reduction_factor": 4}},
    # Knobs beyond the presets.
    "pfeiffer_knobs": {
        "cls": "SeqBnConfig",
        "kw": {
            "reduction_factor": 8,
            "ln_before": True,
            "ln_after": True,
            "residual_before_ln": False,
            "non_linearity": "gelu",
            "scaling": 0.5,
            "leave_out": [0],
        },
    },
    "houlsby_post_add": {
        "cls": "DoubleSeqBnConfig",
        "kw": {
            "reduction_factor": 8,
            "original_ln_before": True,
            "residual_before_ln": "post_add",
            "adapter_residual_before_ln": True,
            "ln_after": True,
            "scaling": "channel",
        },
    },
    "seq_no_ln_after": {
        "cls": "SeqBnConfig",
        "kw": {
            "reduction_factor": 8,
            "original_ln_after": False,
            "scaling": "learned",
            "non_linearity": "tanh",
        },
    },
    "parallel_ln": {
        "cls": "ParBnConfig",
        "kw": {"reduction_factor": 4, "ln_before": True, "ln_after": True, "scaling": 2.0},
    },
}
# The same presets on pre-LayerNorm decoders.
for _arch in ("llama", "gpt2"):
    for _preset, _cls in (
        ("houlsby", "DoubleSeqBnConfig"),
        ("pfeiffer", "SeqBnConfig"),
        ("parallel", "ParBnConfig"),
    ):
        CASES[f"{_arch}_{_preset}"] = {"cls": _cls, "kw": {"reduction_factor": 4}, "arch": _arch}
CASES["xlmr_pfeiffer"] = {"cls": "SeqBnConfig", "kw": {"reduction_factor": 8}, "arch": "xlmr"}
CLASSES = {"DoubleSeqBnConfig": DoubleSeqBnConfig, "SeqBnConfig": SeqBnConfig, "ParBnConfig": ParBnConfig}
DROPOUT = 0.1


def base_model(arch: str = "bert") -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaModel(
            LlamaConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=100,
                attn_implementation="eager",
            )
        ).eval()
    if arch == "xlmr":
        cfg = XLMRobertaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=100,
            pad_token_id=1,
            hidden_dropout_prob=DROPOUT,
            attention_probs_dropout_prob=0.0,
            attn_implementation="eager",
        )
        return XLMRobertaModel(cfg).eval()
    if arch == "gpt2":
        cfg = GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=4,
            vocab_size=100,
            n_positions=64,
            resid_pdrop=DROPOUT,
            embd_pdrop=DROPOUT,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation="eager",
        )
        return GPT2Model(cfg).eval()
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
        hidden_dropout_prob=DROPOUT,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    return BertModel(cfg).eval()


def main(out: str) -> None:
    ids = torch.randint(1, 100, (3, 9), generator=torch.Generator().manual_seed(7))
    for case, spec in CASES.items():
        folder = os.path.join(out, case)
        os.makedirs(folder, exist_ok=True)
        model = base_model(spec.get("arch", "bert"))
        model.save_pretrained(os.path.join(folder, "base"))
        with torch.no_grad():
            base_out = model(input_ids=ids).last_hidden_state
        adapters.init(model)
        config = CLASSES[spec["cls"]](dropout=DROPOUT, **spec["kw"])
        model.add_adapter("ah", config=config)
        torch.manual_seed(3)
        with torch.no_grad():  # non-trivial weights (a fresh up-projection may be zero)
            for name, p in model.named_parameters():
                if ".adapters.ah." in name:
                    p.add_(torch.randn_like(p) * 0.3)
        model.set_active_adapters("ah")
        model.eval()
        with torch.no_grad():
            eval_out = model(input_ids=ids).last_hidden_state
        model.train()
        torch.manual_seed(SEED_TRAIN)
        with torch.no_grad():
            train_out = model(input_ids=ids).last_hidden_state
        model.eval()
        n_params = sum(p.numel() for n, p in model.named_parameters() if ".adapters.ah." in n)
        # Pickle for one preset (older AdapterHub folders) and where the adapter's input LayerNorm is
        # registered twice (``adapter_down.0`` and ``adapter_norm_before``), which safetensors refuses.
        use_st = case != "houlsby" and not spec["kw"].get("ln_before")
        model.save_adapter(os.path.join(folder, "adapter"), "ah", use_safetensors=use_st)
        torch.save(
            {"ids": ids, "eval": eval_out, "train": train_out, "base": base_out, "seed": SEED_TRAIN},
            os.path.join(folder, "io.pt"),
        )
        with open(os.path.join(folder, "params.txt"), "w") as fh:
            fh.write(str(n_params))
    with open(os.path.join(out, "done.json"), "w") as fh:
        json.dump({"adapters": adapters.__version__, "cases": sorted(CASES)}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
