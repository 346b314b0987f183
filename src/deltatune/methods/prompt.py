"""Prompt tuning (Lester et al. 2021): n trainable soft tokens in front of the input embeddings.

::

    input_ids (B, L) ──► word embeddings (B, L, d) ──┐
    soft prompt P (n, d) ──► expand (B, n, d) ───────┴─► cat (B, n + L, d) ──► frozen model

The attention mask gets n leading ones and causal-LM labels n leading -100, so the virtual
tokens are attended to but never scored. Encoder-decoder models get the prompt on the
encoder side. Only P trains: n · d parameters (20 × 4096 = 81,920 on Llama-3-8B).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltatune.config import CliRecipe, PeftType, register_method
from deltatune.methods.prompt_learning import (
    PromptLearningConfig,
    PromptLearningTuner,
    RowPlan,
    accepts,
    bind_inputs,
    check_length,
    copy_into,
    encoders,
    extend_mask,
    generate_inputs,
    is_causal,
)
from deltatune.untrusted import loading


class PromptTuningInit(str, enum.Enum):
    RANDOM = "RANDOM"  # N(0, 1) vectors (may sit off the embedding manifold)
    TEXT = "TEXT"  # embeddings of a tokenised text, repeated or cut to n
    SAMPLE_VOCAB = "SAMPLE_VOCAB"  # embeddings of n random vocabulary tokens

    def __str__(self) -> str:
        return self.value


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``num_virtual_tokens`` soft tokens of the model's embedding width.

    ``prompt_tuning_init="TEXT"`` needs ``prompt_tuning_init_text`` and a tokenizer: either
    ``tokenizer_name_or_path`` (a local folder, loaded with ``AutoTokenizer``) or a tokenizer
    object passed as ``tokenizer=`` (not saved; its ``name_or_path`` is recorded).
    """

    prompt_tuning_init: str = PromptTuningInit.RANDOM.value
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.peft_type = PeftType.PROMPT_TUNING.value
        super().__post_init__()
        init = str(
            self.prompt_tuning_init.value
            if isinstance(self.prompt_tuning_init, enum.Enum)
            else self.prompt_tuning_init
        )
        if init not in PromptTuningInit._value2member_map_:
            raise ValueError(
                f"prompt_tuning_init={self.prompt_tuning_init!r} is not known; use one of "
                f"{[i.value for i in PromptTuningInit]}."
            )
        self.prompt_tuning_init = init
        if self.tokenizer is not None and self.tokenizer_name_or_path is None:
            self.tokenizer_name_or_path = getattr(self.tokenizer, "name_or_path", None) or None
        # A loaded adapter (inference mode) already holds its trained prompt: no init needed.
        if init == PromptTuningInit.TEXT.value and not self.inference_mode:
            if self.tokenizer is None and not self.tokenizer_name_or_path:
                raise ValueError(
                    "prompt_tuning_init='TEXT' turns prompt_tuning_init_text into token embeddings, which needs a "
                    "tokenizer: pass tokenizer_name_or_path='<local tokenizer folder>' or tokenizer=<tokenizer "
                    "object>, or use prompt_tuning_init='SAMPLE_VOCAB' / 'RANDOM'."
                )
            if not self.prompt_tuning_init_text:
                raise ValueError(
                    "prompt_tuning_init='TEXT' needs prompt_tuning_init_text (e.g. 'Classify the sentiment:'); "
                    f"got {self.prompt_tuning_init_text!r}."
                )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("tokenizer", None)  # an object, not a setting: never written to adapter_config.json
        return out


class PromptEmbedding(nn.Module):
    """The soft prompt: ``embedding.weight`` is (n · submodules, d) (PEFT's layout; seq2seq uses the first n)."""

    def __init__(self, total: int, token_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(total, token_dim)

    def forward(self) -> torch.Tensor:
        """The soft prompt table, (total virtual tokens, token_dim)."""
        return self.embedding.weight


def _init_ids(config: PromptTuningConfig, total: int, vocab: int) -> list[int] | None:
    if config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB.value:
        return torch.randint(0, vocab, (total,)).tolist()
    if config.prompt_tuning_init != PromptTuningInit.TEXT.value:
        return None
    tokenizer = config.tokenizer
    if tokenizer is None:
        from transformers import AutoTokenizer

        kwargs = dict(config.tokenizer_kwargs or {})
        kwargs.pop("trust_remote_code", None)  # loading an adapter must never run downloaded code
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError(
            f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} tokenises to no tokens."
        )
    too_big = [i for i in ids if i >= vocab]
    if too_big:
        raise ValueError(
            f"The tokenizer gives ids {too_big[:5]} that the model's vocabulary ({vocab} entries) lacks: the "
            "tokenizer does not belong to this model."
        )
    ids = ids * math.ceil(total / len(ids))  # repeat a short text, cut a long one
    return ids[:total]


class PromptTuningTuner(PromptLearningTuner[PromptTuningConfig]):
    prepends_virtual_tokens = True

    def build_encoder(self, peft_model: Any, config: PromptTuningConfig) -> nn.Module:
        assert config.num_virtual_tokens is not None and config.token_dim is not None
        total = config.num_virtual_tokens * (config.num_transformer_submodules or 1)
        encoder = PromptEmbedding(total, config.token_dim)
        if config.inference_mode or config.prompt_tuning_init == PromptTuningInit.RANDOM.value or loading():
            return encoder  # (a loaded adapter's file replaces the init: no tokenizer path from it is read)
        words = peft_model.get_base_model().get_input_embeddings()
        ids = _init_ids(config, total, words.weight.shape[0])
        if ids is not None and not words.weight.is_meta:
            with torch.no_grad():
                vectors = words(torch.tensor(ids, dtype=torch.long, device=words.weight.device))
                encoder.embedding.weight.copy_(vectors.float().cpu())
        return encoder

    def virtual_tokens(self, peft_model: Any, adapter_name: str) -> torch.Tensor:
        return encoders(peft_model)[adapter_name]()

    def load_virtual_tokens(
        self, peft_model: Any, config: PromptTuningConfig, adapter_name: str, value: torch.Tensor
    ) -> None:
        encoder = encoders(peft_model)[adapter_name]
        assert isinstance(encoder, PromptEmbedding)
        copy_into(encoder.embedding.weight, value, f"the soft prompt of {adapter_name!r}")

    # -- forward ------------------------------------------------------------------------
    def _prompts(self, peft_model: Any, plan: RowPlan, n: int, dtype: torch.dtype) -> torch.Tensor:
        """(B, n, d): each row's soft prompt (zeros for base rows)."""
        per = {name: self.virtual_tokens(peft_model, name)[:n] for name in plan.used}
        return plan.gather(per).to(device=plan.device, dtype=dtype)

    def _prepend(
        self, peft_model: Any, inputs: dict[str, Any], adapter_names: list[str] | None, for_generate: bool
    ) -> dict[str, Any] | None:
        """Inputs with the soft prompt in front; ``None`` when no row uses an adapter."""
        model = peft_model.get_base_model()
        config = peft_model.active_peft_config
        n = int(config.num_virtual_tokens)
        ids, embeds = inputs.pop("input_ids", None), inputs.pop("inputs_embeds", None)
        if embeds is None:
            if ids is None:
                raise ValueError(
                    "Prompt tuning needs input_ids or inputs_embeds to put the soft prompt in front of."
                )
            embeds = model.get_input_embeddings()(ids)
        batch, length = embeds.shape[:2]
        plan = RowPlan(peft_model, batch, embeds.device, adapter_names)
        if not plan.used:
            inputs["input_ids" if ids is not None else "inputs_embeds"] = ids if ids is not None else embeds
            return None
        check_length(model, length, n, "prompt tuning")
        encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        at_end = not is_causal(model)  # where base rows of a mixed batch keep their masked slots
        device = embeds.device
        inputs["inputs_embeds"] = plan.join(self._prompts(peft_model, plan, n, embeds.dtype), embeds, at_end)
        mask = inputs.get("attention_mask")
        if for_generate and mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=device)
        inputs["attention_mask"] = extend_mask(mask, plan, n, length, at_end)
        if for_generate and not encoder_decoder:
            # generate() needs the token ids to return them in front of the new tokens.
            inputs["input_ids"] = ids
            return inputs
        if encoder_decoder:
            return inputs  # decoder inputs and labels are untouched
        labels = inputs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() >= 2 and labels.shape[1] == length:
            inputs["labels"] = plan.join(labels.new_full((batch, n, *labels.shape[2:]), -100), labels, at_end)
        token_types = inputs.get("token_type_ids")
        if isinstance(token_types, torch.Tensor):
            inputs["token_type_ids"] = plan.join(token_types.new_zeros(batch, n), token_types, at_end)
        positions = inputs.get("position_ids")
        if positions is None and plan.has_base_rows and not at_end and accepts(model.forward, "position_ids"):
            positions = torch.arange(length, device=device).unsqueeze(0).expand(batch, -1)
        if positions is not None:
            # Adapter rows: prompt at 0..n-1, text shifted by n; base rows: text where it was alone.
            rows = plan.adapter_rows.to(positions.device).unsqueeze(1)
            virtual = (
                torch.arange(n, device=positions.device).unsqueeze(0).expand(batch, -1).to(positions.dtype)
            )
            inputs["position_ids"] = plan.join(virtual * rows, positions + rows * n, at_end)
        return inputs

    def forward(
        self, peft_model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], adapter_names: Any
    ) -> Any:
        """The base model on the inputs with each row's soft prompt in front of its embeddings."""
        model = peft_model.get_base_model()
        inputs = bind_inputs(model.forward, args, kwargs)
        self._prepend(peft_model, inputs, adapter_names, for_generate=False)
        return model(**inputs)

    def generate(
        self, peft_model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], adapter_names: Any
    ) -> Any:
        """``generate`` on the inputs with the soft prompts in front (see :meth:`forward`)."""
        model = peft_model.get_base_model()
        inputs = generate_inputs(args, kwargs)
        prepared = self._prepend(peft_model, inputs, adapter_names, for_generate=True)
        return model.generate(**(prepared if prepared is not None else inputs))


register_method(
    PeftType.PROMPT_TUNING,
    PromptTuningConfig,
    PromptTuningTuner,
    cli=[
        CliRecipe(
            "prompt",
            "prompt tuning: trained virtual token embeddings",
            3e-2,
            config_defaults={"num_virtual_tokens": 20},
        )
    ],
)
