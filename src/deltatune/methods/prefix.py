"""Prefix tuning (Li & Liang 2021): trainable keys and values in front of every attention layer.

The prefix is handed to the model as its key/value cache, so each attention layer sees n
extra positions it attends to::

    prefix P (n, 2 · layers · d_kv)          d_kv = head_dim · num_key_value_heads
       └─ view (B, n, 2·layers, heads, head_dim) → per layer: K_l, V_l (B, heads, n, head_dim)
              └─ DynamicCache (decoder-only, encoders) / EncoderDecoderCache (T5: decoder self-attention)

    layer l:  K = [K_l ; W_K h],  V = [V_l ; W_V h],  attention mask gets n leading ones

With ``prefix_projection=True`` the prefixes are produced during training by a small MLP
(embedding (n, d) → Linear → Tanh → Linear → (n, 2 · layers · d_kv)); the file stores only the
resulting prefixes, so the MLP is discarded and a saved adapter has the same size either way.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
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
    fill_model_fields,
    generate_inputs,
    text_config,
)


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: ``num_virtual_tokens`` key/value positions for every attention layer.

    ``token_dim`` becomes the key/value width ``head_dim · num_key_value_heads`` (grouped-query
    attention) and ``num_attention_heads`` the number of key/value heads, as in the ecosystem's
    files. ``encoder_hidden_size`` is the hidden width of the reparameterisation MLP used when
    ``prefix_projection=True`` (default: ``token_dim``). ``init_weights="zero"`` starts from an
    all-zero prefix.
    """

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.PREFIX_TUNING.value
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None (random) or 'zero', got {self.init_weights!r}.")


def _kv_fields(config: PrefixTuningConfig, model: nn.Module) -> None:
    """Key/value width per layer: head_dim × number of key/value heads (GQA-aware)."""
    cfg = text_config(model)
    if cfg is None or config.token_dim is not None:
        return  # set by the user or by a loaded adapter's config
    heads = (
        getattr(cfg, "num_attention_heads", None)
        or getattr(cfg, "n_head", None)
        or getattr(cfg, "num_heads", None)
    )
    hidden = (
        getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or getattr(cfg, "d_model", None)
    )
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "d_kv", None)
    if head_dim is None and heads and hidden:
        head_dim = hidden // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    if head_dim and kv_heads:
        config.token_dim = int(head_dim) * int(kv_heads)
        if config.num_attention_heads is None:
            config.num_attention_heads = int(kv_heads)


class PrefixEncoder(nn.Module):
    """Produces the prefix (n, 2 · layers · d_kv), directly or through the reparameterisation MLP."""

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        n, d = int(config.num_virtual_tokens or 0), int(config.token_dim or 0)
        width = int(config.num_layers or 0) * 2 * d
        self.projected = bool(config.prefix_projection) and not config.inference_mode
        if self.projected:
            hidden = int(config.encoder_hidden_size or d)
            self.embedding = nn.Embedding(n, d)
            self.transform = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, width))
            last: nn.Module = self.transform[-1]
        else:
            self.embedding = nn.Embedding(n, width)
            last = self.embedding
        if config.init_weights == "zero":
            for p in last.parameters():
                nn.init.zeros_(p)

    def forward(self) -> torch.Tensor:
        """The per-layer key/value prefixes, through the reparameterisation MLP when it is on."""
        if self.projected:
            return self.transform(self.embedding.weight)
        return self.embedding.weight


def _cache_argument(fn: Any) -> str | None:
    for name in ("cache", "past_key_values"):  # transformers ≥ 5.x / older releases
        if accepts(fn, name):
            return name
    return None


def _take_cache_alias(inputs: dict[str, Any], name: str) -> None:
    """Move a cache the caller passed under the other name ('past_key_values' ↔ 'cache', both
    accepted by transformers 5) to ``name``, and refuse a value that is not a cache (e.g. an
    attention mask passed positionally into the cache's slot) instead of replacing it silently."""
    other = "past_key_values" if name == "cache" else "cache"
    if inputs.get(other) is not None:
        if inputs.get(name) is not None:
            raise ValueError(f"Both {name}= and {other}= were given; pass the key/value cache once.")
        inputs[name] = inputs.pop(other)
    given = inputs.get(name)
    if given is not None and not hasattr(given, "get_seq_length"):
        raise ValueError(
            f"{name}= got a {type(given).__name__}, not a key/value cache (a transformers Cache, such as "
            "the past_key_values an earlier call returned). An attention mask goes in attention_mask=."
        )


def _backbone(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The outermost submodule whose forward takes a key/value cache (e.g. ``bert`` in BertFor...)."""
    for path, module in model.named_modules():
        if path and _cache_argument(module.forward) is not None:
            return path, module
    return None


def _has_prefix(cache: Any) -> bool:
    """True for a cache that already holds positions (the user continues a previous call)."""
    get = getattr(cache, "get_seq_length", None)
    return bool(callable(get) and get() > 0)


def _refuse_checkpointing(model: nn.Module) -> None:
    """transformers' gradient checkpointing sets ``cache=None`` in every checkpointed layer, which
    would silently drop the prefix (no gradient, base outputs): refuse instead."""
    if not (model.training and torch.is_grad_enabled()):
        return
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        raise ValueError(
            "Prefix tuning cannot train with gradient checkpointing: the prefix reaches attention as the key/value "
            "cache, and transformers' checkpointed layers discard the cache (cache=None), so the prefix would get "
            "no gradient. Call model.gradient_checkpointing_disable(), or use prompt tuning or LoRA, which work "
            "with checkpointing."
        )


class PrefixTuningTuner(PromptLearningTuner[PrefixTuningConfig]):
    def check_config(self, model: nn.Module, config: PrefixTuningConfig) -> None:
        super().check_config(model, config)
        if _cache_argument(model.forward) is None and _backbone(model) is None:
            raise ValueError(
                f"Prefix tuning hands the prefix to the model as its key/value cache, but {type(model).__name__} "
                "has no forward (of itself or of a submodule) that accepts a cache ('cache' / 'past_key_values'), "
                "so its attention cannot take a prefix. Use prompt tuning (PromptTuningConfig) or LoRA instead."
            )

    def inject(self, peft_model: Any, config: PrefixTuningConfig, adapter_name: str) -> None:
        self.check_config(peft_model.get_base_model(), config)
        _kv_fields(config, peft_model.get_base_model())
        fill_model_fields(config, peft_model.get_base_model())
        if config.num_layers is None or config.num_attention_heads is None:
            raise ValueError(
                "Could not read the model's layer and head counts; set num_layers and num_attention_heads."
            )
        if config.encoder_hidden_size is None:
            config.encoder_hidden_size = config.token_dim
        super().inject(peft_model, config, adapter_name)

    def build_encoder(self, peft_model: Any, config: PrefixTuningConfig) -> nn.Module:
        return PrefixEncoder(config)

    def virtual_tokens(self, peft_model: Any, adapter_name: str) -> torch.Tensor:
        return encoders(peft_model)[adapter_name]()

    def load_virtual_tokens(
        self, peft_model: Any, config: PrefixTuningConfig, adapter_name: str, value: torch.Tensor
    ) -> None:
        bank = encoders(peft_model)
        encoder = bank[adapter_name]
        assert isinstance(encoder, PrefixEncoder)
        if encoder.projected:
            # Files hold the prefixes the MLP produced; the MLP itself cannot be recovered from them,
            # so training continues on the prefixes directly.
            warnings.warn(
                f"Adapter {adapter_name!r}: the file holds final prefixes, not the reparameterisation MLP; "
                "continuing with the prefixes as trainable parameters (prefix_projection has no effect now).",
                stacklevel=3,
            )
            plain = PrefixEncoder(PrefixTuningConfig(**{**config.to_dict(), "prefix_projection": False}))
            plain.to(encoder.embedding.weight.device)
            requires_grad = encoder.embedding.weight.requires_grad
            for p in plain.parameters():
                p.requires_grad_(requires_grad)
            bank[adapter_name] = plain
            encoder = plain
        copy_into(encoder.embedding.weight, value, f"the prefix of {adapter_name!r}")

    # -- the cache ------------------------------------------------------------------------
    def build_cache(self, peft_model: Any, plan: RowPlan, dtype: torch.dtype) -> Any:
        """A fresh transformers cache holding each row's prefix (zeros for base rows)."""
        from transformers import DynamicCache, EncoderDecoderCache

        config = peft_model.active_peft_config
        n, layers = int(config.num_virtual_tokens), int(config.num_layers)
        heads = int(config.num_attention_heads)
        head_dim = int(config.token_dim) // heads
        per = {name: self.virtual_tokens(peft_model, name) for name in plan.used}
        prefix = plan.gather(per).to(device=plan.device, dtype=dtype)  # (B, n, 2·layers·d_kv)
        kv = prefix.reshape(prefix.shape[0], n, 2 * layers, heads, head_dim)
        submodules = int(config.num_transformer_submodules or 1)
        if submodules == 2:
            # The ecosystem's layout for encoder-decoders: the column blocks are read twice as
            # (self K, self V, cross K, cross V) per decoder layer; only self-attention is kept.
            kv = torch.cat([kv, kv], dim=2)
        kv = kv.permute(2, 0, 3, 1, 4)  # (2·layers·submodules, B, heads, n, head_dim)
        step = 2 * submodules
        cache = DynamicCache()
        for layer in range(layers):
            cache.update(kv[step * layer], kv[step * layer + 1], layer)
        if submodules == 2:
            # Cross-attention keys come from the encoder output; leave that cache empty.
            return EncoderDecoderCache(cache, DynamicCache())
        return cache

    def _prepare(
        self, peft_model: Any, inputs: dict[str, Any], adapter_names: list[str] | None, for_generate: bool
    ) -> Any:
        """Add the prefix cache and extended masks to ``inputs``; returns the cache (``None``: no adapter rows)."""
        model = peft_model.get_base_model()
        config = peft_model.active_peft_config
        n = int(config.num_virtual_tokens)
        encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        main = inputs.get("input_ids")
        if main is None:
            main = inputs.get("inputs_embeds")
        if main is None:
            raise ValueError("Prefix tuning needs input_ids or inputs_embeds.")
        batch, length = main.shape[:2]
        plan = RowPlan(peft_model, batch, main.device, adapter_names)
        if not plan.used:
            return None
        name = _cache_argument(model.forward)
        if name is not None:
            _take_cache_alias(inputs, name)
        if name is not None and _has_prefix(inputs.get(name)):
            # Continuing from a cache that already holds the prefix: only the masks grow.
            self._extend_masks(inputs, plan, n, length, encoder_decoder, for_generate)
            return inputs[name]
        if not encoder_decoder:
            check_length(model, length, n, "prefix tuning")
        _refuse_checkpointing(model)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        cache = self.build_cache(peft_model, plan, dtype)
        self._extend_masks(inputs, plan, n, length, encoder_decoder, for_generate)
        if not encoder_decoder and not for_generate:
            positions = inputs.get("position_ids")
            if positions is None and plan.has_base_rows and accepts(model.forward, "position_ids"):
                positions = torch.arange(length, device=main.device).unsqueeze(0).expand(batch, -1)
            if positions is not None:
                # Real tokens follow the n cached positions; base rows keep their own positions.
                inputs["position_ids"] = positions + plan.adapter_rows.to(positions.dtype).unsqueeze(1) * n
        if name is not None:
            inputs[name] = cache
            if (
                accepts(model.forward, "use_cache")
                and inputs.get("use_cache") is False
                and not encoder_decoder
            ):
                inputs.pop("use_cache")  # the prefix needs the cache path even when no cache is returned
        return cache

    @staticmethod
    def _extend_masks(
        inputs: dict[str, Any], plan: RowPlan, n: int, length: int, encoder_decoder: bool, for_generate: bool
    ) -> None:
        if encoder_decoder:
            # The prefix sits in the decoder's self-attention; the encoder mask is untouched.
            mask = inputs.get("decoder_attention_mask")
            if mask is None and plan.has_base_rows:
                dec = inputs.get("decoder_input_ids")
                if dec is None:
                    dec = inputs.get("decoder_inputs_embeds")
                dec_len = dec.shape[1] if dec is not None else 1
                mask = torch.ones(len(plan.names), dec_len, dtype=torch.long, device=plan.device)
            if mask is not None:
                inputs["decoder_attention_mask"] = extend_mask(mask, plan, n, mask.shape[1])
            return
        mask = inputs.get("attention_mask")
        if mask is None and for_generate:
            mask = torch.ones(len(plan.names), length, dtype=torch.long, device=plan.device)
        inputs["attention_mask"] = extend_mask(mask, plan, n, length)

    def forward(
        self, peft_model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], adapter_names: Any
    ) -> Any:
        """The base model with each row's key/value prefixes as the attention cache it starts from
        (handed to the backbone when the top model takes no cache, e.g. a classifier)."""
        model = peft_model.get_base_model()
        inputs = bind_inputs(model.forward, args, kwargs)
        cache = self._prepare(peft_model, inputs, adapter_names, for_generate=False)
        if cache is None or _cache_argument(model.forward) is not None:
            return model(**inputs)
        # The top model takes no cache (e.g. BertForSequenceClassification): give it to the backbone.
        found = _backbone(model)
        assert found is not None
        _, backbone = found
        arg = _cache_argument(backbone.forward)

        def inject(
            _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[Any, dict[str, Any]]:
            kwargs[str(arg)] = cache
            return args, kwargs

        handle = backbone.register_forward_pre_hook(inject, with_kwargs=True)
        try:
            return model(**inputs)
        finally:
            handle.remove()

    def generate(
        self, peft_model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], adapter_names: Any
    ) -> Any:
        """``generate`` starting from the prefix cache; the mask covers the prefix positions."""
        model = peft_model.get_base_model()
        inputs = generate_inputs(args, kwargs)
        if _cache_argument(model.forward) is None:
            raise ValueError(
                f"{type(model).__name__} cannot generate with a prefix: its forward takes no cache."
            )
        # With a mask longer than input_ids, generate() treats the cache as extra leading
        # positions (it does not slice the input), and derives positions from the mask.
        self._prepare(peft_model, inputs, adapter_names, for_generate=True)
        return model.generate(**inputs)


register_method(
    PeftType.PREFIX_TUNING,
    PrefixTuningConfig,
    PrefixTuningTuner,
    cli=[
        CliRecipe(
            "prefix",
            "prefix tuning: trained per-layer key/value prefixes",
            1e-2,
            config_defaults={"num_virtual_tokens": 20},
        )
    ],
)
