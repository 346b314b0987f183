"""Helpers shared by the tests: tiny models with random weights built from transformers configs (no
hub download), their inputs, and checks used by several test files. Fixtures live in conftest.py."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


def tiny_llama(task: str = "causal", seed: int = 0, **kw: object) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    settings: dict[str, object] = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 96,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
    }
    cfg = LlamaConfig(**{**settings, **kw})
    cls = LlamaForSequenceClassification if task == "seq_cls" else LlamaForCausalLM
    return cls(cfg).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64)).eval()


def tiny_bert(task: str = "seq_cls", seed: int = 0) -> nn.Module:
    from transformers import (
        BertConfig,
        BertForQuestionAnswering,
        BertForSequenceClassification,
        BertForTokenClassification,
        BertModel,
    )

    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=96,
        num_labels=2 if task == "qa" else 3,
    )
    cls = {
        "seq_cls": BertForSequenceClassification,
        "token_cls": BertForTokenClassification,
        "qa": BertForQuestionAnswering,
        "feature": BertModel,
    }[task]
    return cls(cfg).eval()


def tiny_t5(seed: int = 0) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(
        d_model=32,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        d_kv=8,
        vocab_size=96,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return T5ForConditionalGeneration(cfg).eval()


def tiny_wide(kind: str = "llama", seed: int = 0) -> nn.Module:
    """A 2-layer ``kind`` model of width 64 and a 128-token vocabulary (rows as long as the 64-weight
    blocks of NF4 and bitsandbytes): llama, mistral, qwen2, gpt2 (LM heads), bert, roberta
    (encoders), t5 (seq2seq); eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    decoder = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    encoder = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=128
    )
    build: dict[str, Callable[[], nn.Module]] = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**decoder)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**decoder)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**decoder)),
        "gpt2": lambda: tf.GPT2LMHeadModel(
            tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, bos_token_id=0, eos_token_id=0)
        ),
        "bert": lambda: tf.BertModel(tf.BertConfig(**encoder)),
        "roberta": lambda: tf.RobertaModel(tf.RobertaConfig(**encoder, pad_token_id=1)),
        "t5": lambda: tf.T5ForConditionalGeneration(
            tf.T5Config(
                d_model=64,
                d_ff=128,
                num_layers=2,
                num_heads=4,
                d_kv=16,
                vocab_size=128,
                decoder_start_token_id=0,
            )
        ),
    }
    return build[kind]().eval()


class MLP(nn.Module):
    """A user's own torch model: no transformers config at all."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 20)
        self.out = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.relu(self.lin1(self.relu(self.lin0(x)))))


def tiny_mlp(seed: int = 0) -> nn.Module:
    return MLP(seed).eval()


# name -> (factory, LoRA targets, input builder)
def _ids(batch: int = 3, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 96, (batch, length), generator=g)}


def _t5_inputs(batch: int = 3, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    out = _ids(batch, length, seed)
    out["decoder_input_ids"] = _ids(batch, 5, seed + 1)["input_ids"]
    return out


def _mlp_inputs(batch: int = 3, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 10, generator=g)}


MODELS: dict[str, tuple[Callable[..., nn.Module], list[str], Callable[..., dict[str, torch.Tensor]]]] = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "up_proj", "down_proj"], _ids),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], _ids),
    "bert": (tiny_bert, ["query", "value", "dense"], _ids),
    "t5": (tiny_t5, ["q", "v", "wo"], _t5_inputs),
    "mlp": (tiny_mlp, ["lin0", "lin1"], _mlp_inputs),
}


def model_output(out: object) -> torch.Tensor:
    """The main tensor of a model's output (logits, or the tensor itself)."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "last_hidden_state", "start_logits"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise TypeError(type(out))


def state_changed_by_one_step(model: nn.Module, inputs: dict[str, torch.Tensor]) -> set[str]:
    """State-dict keys that one AdamW step on the trainable parameters (LM loss) changes."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    opt.step()
    after = model.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


def randomize_lora(model: nn.Module, std: float = 0.5, seed: int = 3) -> None:
    """Give every LoRA B a non-zero value so that adapters visibly change outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def assert_rows_match_alone(
    model: nn.Module, x: torch.Tensor, names: list[str], forward: Callable[..., torch.Tensor]
) -> None:
    """A mixed-batch forward (row i through adapter ``names[i]``, "__base__" for none) equals
    running each row alone with that adapter active (or all adapters disabled)."""
    mixed = forward(model, x, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():  # type: ignore[operator]
                expected = forward(model, x[row : row + 1])
        else:
            model.set_adapter(name)  # type: ignore[operator]
            expected = forward(model, x[row : row + 1])
        torch.testing.assert_close(mixed[row : row + 1], expected, rtol=1e-5, atol=1e-5)


def peft_classifier_adapter(path: str) -> nn.Module:
    """A PEFT SEQ_CLS LoRA adapter on tiny BERT with a trained (non-initial) classifier head,
    saved to ``path``; returns PEFT's model."""
    import peft

    theirs = peft.get_peft_model(
        tiny_bert(), peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"])
    )
    randomize_lora(theirs)
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    theirs.save_pretrained(path)
    return theirs


def token_ids(batch: int = 3, length: int = 7, seed: int = 1, vocab: int = 96) -> torch.Tensor:
    """A fixed batch of token ids (1 .. vocab - 1) for the tiny models."""
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def once_per_run(name: str, build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """``build(folder)``: computed by one pytest-xdist worker per run, loaded by the others.

    The result (tensors, numbers, strings) is saved in ``$DELTATUNE_HOME``, which the workers of a
    run share (see conftest's ``deltatune_home``); ``folder`` is there too, for files it writes.
    """
    import fcntl

    home = Path(os.environ["DELTATUNE_HOME"])
    with open(home / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other workers wait for the one building it
        saved = home / f"{name}.pt"
        if saved.exists():
            return dict(torch.load(saved))
        folder = home / name
        folder.mkdir(exist_ok=True)
        result = build(folder)
        torch.save(result, saved)
        return result


def trainable_report(model: Any) -> str:
    """The line ``model.print_trainable_parameters()`` prints."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        model.print_trainable_parameters()
    return buf.getvalue().strip()


# The tiny models of each task type, for the virtual-token methods (prompt / prefix tuning).
VIRTUAL_TOKEN_TASKS: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "llama": (tiny_llama, "CAUSAL_LM"),
    "gpt2": (tiny_gpt2, "CAUSAL_LM"),
    "bert": (tiny_bert, "SEQ_CLS"),
    "t5": (tiny_t5, "SEQ_2_SEQ_LM"),
}


def llama3_8b_meta() -> nn.Module:
    """Llama-3-8B's shapes on the meta device (no memory): for parameter-count figures."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def no_eos(model: nn.Module) -> nn.Module:
    """Random tiny models emit their EOS id by chance; generate() would then stop that row early."""
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = None
    return model


def greedy_by_forward(model: nn.Module, x: torch.Tensor, steps: int, seq2seq: bool = False) -> torch.Tensor:
    """Greedy decoding by recomputing the full forward each step (no cache): the reference."""
    with torch.no_grad():
        if seq2seq:
            dec = torch.zeros(x.shape[0], 1, dtype=torch.long)
            for _ in range(steps):
                logits = model(input_ids=x, attention_mask=torch.ones_like(x), decoder_input_ids=dec).logits
                dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], 1)
            return dec
        cur = x
        for _ in range(steps):
            logits = model(input_ids=cur, attention_mask=torch.ones_like(cur)).logits
            cur = torch.cat([cur, logits[:, -1].argmax(-1, keepdim=True)], 1)
        return cur


def dense_twin(model: nn.Module) -> nn.Module:
    """A copy of a quantised model (deltatune's or bitsandbytes' 4/8-bit layers) whose quantised
    linear layers are nn.Linear holding the dequantised weights."""
    import copy

    from deltatune.quant import Linear4bit, to_dense_linear

    twin = copy.deepcopy(model)
    for path, m in list(twin.named_modules()):
        if isinstance(m, Linear4bit) or type(m).__module__.startswith("bitsandbytes"):
            parent, _, child = path.rpartition(".")
            setattr(twin.get_submodule(parent), child, to_dense_linear(m))
    return twin


def inputs_for(name: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Keyword inputs for the tiny model ``name`` (T5 also gets decoder ids) on token ids ``x``."""
    out = {"input_ids": x, "attention_mask": torch.ones_like(x)}
    if name == "t5":
        out["decoder_input_ids"] = x[:, :3]
    return out


def randomize_prompt(model: nn.Module, seed: int, std: float = 1.0) -> None:
    """New random values for every parameter of a prompt-learning model's prompt encoders."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():  # type: ignore[union-attr]
            p.copy_(torch.randn(p.shape, generator=g) * std)


# -- serving: a tiny Llama and a character-level tokenizer with a chat template -----------------
def base_model() -> torch.nn.Module:
    return tiny_llama(vocab_size=100, max_position_embeddings=128)


def char_tokenizer() -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{chr(c): c - 28 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    return fast


def tiny_mixtral(seed: int = 0) -> nn.Module:
    """A 2-layer Mixtral with 4 fused experts (top-2), routers given non-trivial weights."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    model = MixtralForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") or p.dim() == 3:
                p.normal_(0, 0.2)
    return model.eval()


def random_bf16_llama_folder(folder: str, **config: Any) -> tuple[int, int]:
    """Save a Llama of the given shape with random bf16 weights as a transformers model folder
    (``config.json`` + ``model.safetensors``), never holding more than its tensors once.
    Returns (bytes of all tensors, values of the largest tensor)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(max_position_embeddings=128, dtype="bfloat16", **config)
    with torch.device("meta"):
        meta = LlamaForCausalLM(cfg)
    cfg.save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    tensors = {
        k: (torch.randn(v.shape, generator=gen) * 0.02).to(torch.bfloat16)
        for k, v in meta.state_dict().items()
    }
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return sum(t.nbytes for t in tensors.values()), max(t.numel() for t in tensors.values())


def run_json_script(script: str, *args: str) -> dict[str, Any]:
    """Run ``python -c script args...`` in a fresh process; the last line it prints is JSON."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, check=True, env=os.environ
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


_LOAD_PEAK_SCRIPT = """
import ctypes, gc, json, sys, torch
torch.set_num_threads(1)
import deltatune as dt
from deltatune.quant import LoftQConfig, load_quantized, memory_footprint
import transformers.models.llama.modeling_llama  # imports done before the baseline

def rss():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}

SETUP
# A first load pays the one-time costs (lazy imports, shared libraries mapped, allocator
# arenas) that a long-lived process has already paid; the measured load is the second one.
warm = load_quantized(sys.argv[1])
del warm
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
before = rss()["VmRSS"]
model = LOAD
after = rss()
print(json.dumps({"before": before, "peak": after["VmHWM"], "after": after["VmRSS"],
                  "model": memory_footprint(model)["total_bytes"]}))
"""


def load_peak(folder: str, load: str = "load_quantized(sys.argv[1])", setup: str = "") -> dict[str, Any]:
    """Resident memory of a second ``load`` of ``folder`` in a fresh process (Linux /proc):
    ``{"before", "peak", "after"}`` RSS in bytes around it and the loaded ``"model"``'s bytes.
    ``setup`` runs first (names the load uses; one-time work to pay before the baseline)."""
    script = _LOAD_PEAK_SCRIPT.replace("SETUP", setup).replace("LOAD", load)
    return run_json_script(script, folder)
