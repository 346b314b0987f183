"""What prompt tuning and prefix tuning share: config fields, the encoder bank, files, mixed batches.

Prompt-learning methods touch no weight of the model. Their trainable tensors live on the
wrapper, in ``peft_model.prompt_encoder`` (an ``nn.ModuleDict`` keyed by adapter name), and
condition the frozen model through its inputs: soft tokens in front of the input embeddings
(prompt tuning) or a key/value prefix for every attention layer (prefix tuning)::

    PeftModel
    ├── base_model            the frozen transformers model (heads in ModulesToSaveWrapper)
    └── prompt_encoder        ModuleDict {adapter name: encoder}
        └── default.embedding nn.Embedding(n, width)

The file holds one tensor, ``prompt_embeddings`` (the encoder's output for the n virtual
tokens), plus trained task heads under ``base_model.<head>.weight`` (the ecosystem's keys).

The user never sees the virtual positions in what they pass: attention masks, labels and
position ids are always given for the real tokens only and extended here.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from deltatune.config import PeftConfig, field_list
from deltatune.methods.base import BASE_ADAPTER, Tuner, copy_checked

EMBEDDINGS_KEY = "prompt_embeddings"
HEAD_PREFIX = "base_model."  # trained heads' key prefix in prompt-learning files


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields every prompt-learning config has (names as in the ecosystem's files).

    ``token_dim``, ``num_layers``, ``num_attention_heads`` and ``num_transformer_submodules``
    are read from the model when left ``None``.
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = field_list()

    @property
    def is_prompt_learning(self) -> bool:
        return True

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(
                f"num_virtual_tokens must be a positive integer (the number of soft tokens), got {n!r}. "
                "Typical values are 10 to 100."
            )


def text_config(model: nn.Module) -> Any:
    """The config of the language part of ``model`` (``None`` for a plain torch module)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return cfg


def _first_attr(cfg: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return None


def fill_model_fields(config: PromptLearningConfig, model: nn.Module) -> None:
    """Read the model's dimensions into the config fields the user left unset."""
    cfg = text_config(model)
    if cfg is None:
        if config.token_dim is None:
            raise ValueError(
                f"{type(model).__name__} has no transformers config, so {type(config).__name__} cannot read the "
                "embedding width: set token_dim (and num_layers / num_attention_heads for prefix tuning)."
            )
        config.num_transformer_submodules = config.num_transformer_submodules or 1
        return
    if config.num_layers is None:
        config.num_layers = _first_attr(cfg, ("num_hidden_layers", "num_layers", "n_layer"))
    if config.token_dim is None:
        config.token_dim = _first_attr(cfg, ("hidden_size", "n_embd", "d_model"))
    if config.num_attention_heads is None:
        config.num_attention_heads = _first_attr(cfg, ("num_attention_heads", "n_head", "num_heads"))
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if str(config.task_type) == "SEQ_2_SEQ_LM" else 1
    if config.token_dim is None:
        raise ValueError(
            f"Could not read the embedding width of {type(model).__name__}; set token_dim in the config."
        )


def position_limit(model: nn.Module) -> int | None:
    """Longest sequence the model's position embeddings cover (``None``: no fixed limit, e.g. T5)."""
    cfg = text_config(model)
    if cfg is None:
        return None
    limit = _first_attr(cfg, ("max_position_embeddings", "n_positions"))
    return int(limit) if limit else None


def check_length(model: nn.Module, seq_len: int, n: int, what: str) -> None:
    """Refuse an input that no longer fits the position embeddings once ``n`` virtual tokens are added."""
    limit = position_limit(model)
    if limit is not None and seq_len + n > limit:
        raise ValueError(
            f"The input has {seq_len} tokens; with the {n} virtual tokens of {what} that makes {seq_len + n} "
            f"positions, but {type(model).__name__} has position embeddings for {limit}. Shorten the input by "
            f"{seq_len + n - limit} token(s) (or use fewer virtual tokens)."
        )


def bind_inputs(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional arguments of a call turned into keyword arguments (by ``fn``'s signature)."""
    if not args:
        return dict(kwargs)
    params = [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"
    ]
    if len(args) > len(params):
        raise TypeError(f"Too many positional arguments ({len(args)}) for {fn.__qualname__}.")
    out = dict(zip(params, args))
    clash = sorted(set(out) & set(kwargs))
    if clash:
        raise TypeError(f"Arguments {clash} were given both by position and by keyword.")
    out.update(kwargs)
    return out


def generate_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``generate()``'s inputs as keywords: a positional argument can only be ``input_ids``."""
    inputs = dict(kwargs)
    if args:
        if "input_ids" in inputs or len(args) > 1:
            raise TypeError("Pass generate() inputs by keyword (input_ids=..., attention_mask=...).")
        inputs["input_ids"] = args[0]
    return inputs


def accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def encoders(peft_model: Any) -> nn.ModuleDict:
    """The wrapper's bank of prompt encoders, created on first use (so it shows in named_parameters)."""
    bank = peft_model._modules.get("prompt_encoder")
    if bank is None:
        bank = nn.ModuleDict()
        peft_model.prompt_encoder = bank
    return bank


class RowPlan:
    """Which rows of a batch use which adapter (one adapter, or a mixed batch).

    ``names`` holds one adapter name (or ``"__base__"``) per row; ``adapter_rows`` is a
    bool tensor (B,) that is False for ``"__base__"`` rows, whose virtual positions are
    masked out so that they see the base model alone.
    """

    def __init__(
        self, peft_model: Any, batch: int, device: torch.device, adapter_names: list[str] | None
    ) -> None:
        active = peft_model.active_adapter
        self.names = list(adapter_names) if adapter_names is not None else [active] * batch
        used = sorted({n for n in self.names if n != BASE_ADAPTER})
        ref = peft_model.peft_config.get(active)
        for name in used:
            cfg = peft_model.peft_config[name]
            if ref is None:
                ref = cfg
            if cfg.peft_type != ref.peft_type or cfg.num_virtual_tokens != ref.num_virtual_tokens:
                raise ValueError(
                    f"A mixed batch needs prompt-learning adapters of one kind and one length: {name!r} is "
                    f"{cfg.peft_type} with {cfg.num_virtual_tokens} virtual tokens, the active adapter "
                    f"{active!r} is {ref.peft_type} with {ref.num_virtual_tokens}. Run such rows in separate calls."
                )
        self.used = used
        self.device = device
        self.adapter_rows = torch.tensor(
            [n != BASE_ADAPTER for n in self.names], dtype=torch.bool, device=device
        )
        self.has_base_rows = not bool(self.adapter_rows.all())

    def gather(self, per_adapter: dict[str, torch.Tensor]) -> torch.Tensor:
        """Stack one (n, width) tensor per row: the row's adapter's, zeros for base rows → (B, n, width)."""
        first = next(iter(per_adapter.values()))
        if len(per_adapter) == 1 and not self.has_base_rows:
            return first.unsqueeze(0).expand(len(self.names), *first.shape)
        zeros = first.new_zeros(first.shape)
        return torch.stack([per_adapter[n] if n != BASE_ADAPTER else zeros for n in self.names])

    def join(self, virtual: torch.Tensor, real: torch.Tensor, base_at_end: bool) -> torch.Tensor:
        """(B, n, ...) virtual part and (B, L, ...) real part → (B, n + L, ...).

        Adapter rows are always [virtual; real]. Base rows put their masked slots at the end
        when ``base_at_end`` (encoders, whose pooler reads position 0), else at the start
        (causal models, whose heads read the last position).
        """
        front = torch.cat([virtual, real], dim=1)
        if not (base_at_end and self.has_base_rows):
            return front
        back = torch.cat([real, virtual], dim=1)
        rows = self.adapter_rows.to(real.device).view(-1, *([1] * (real.dim() - 1)))
        return torch.where(rows, front, back)

    def prefix_mask(self, n: int, like: torch.Tensor | None) -> torch.Tensor:
        """Attention mask (B, n) for the virtual positions: 1 for adapter rows, 0 for base rows."""
        dtype = like.dtype if like is not None else torch.long
        return self.adapter_rows.to(dtype).unsqueeze(1).expand(-1, n)


def is_causal(model: nn.Module) -> bool:
    """True when the model's attention is causal (decoder-only LMs); False for encoders."""
    return any(getattr(m, "is_causal", False) is True for m in model.modules())


def extend_mask(
    mask: torch.Tensor | None, plan: RowPlan, n: int, length: int, base_at_end: bool = False
) -> torch.Tensor | None:
    """Attention mask (B, L) → (B, n + L); ``None`` stays ``None`` unless base rows need masking."""
    if mask is None:
        if not plan.has_base_rows:
            return None
        mask = torch.ones(len(plan.names), length, dtype=torch.long, device=plan.device)
    if mask.dim() != 2:
        raise ValueError(
            f"Prompt learning extends 2-D attention masks (batch, length); got a {mask.dim()}-D mask. "
            "Pass the usual padding mask."
        )
    return plan.join(plan.prefix_mask(n, mask).to(mask.device), mask, base_at_end)


PLConfigT = TypeVar("PLConfigT", bound=PromptLearningConfig)


class PromptLearningTuner(Tuner[PLConfigT]):
    """Shared lifecycle of prompt-learning methods; subclasses build the encoder and the forward."""

    saved_prefix: ClassVar[str] = ""

    @property
    def is_layer_based(self) -> bool:
        return False

    # -- encoder ----------------------------------------------------------------------
    def build_encoder(self, peft_model: Any, config: PLConfigT) -> nn.Module:
        raise NotImplementedError

    def check_config(self, model: nn.Module, config: PLConfigT) -> None:
        if not isinstance(config, PromptLearningConfig):
            raise TypeError(
                f"{type(self).__name__} needs a prompt-learning config, got {type(config).__name__}."
            )

    def inject(self, peft_model: Any, config: PLConfigT, adapter_name: str) -> None:
        model = peft_model.get_base_model()
        self.check_config(model, config)
        fill_model_fields(config, model)
        encoder = self.build_encoder(peft_model, config)
        ref = next(model.parameters(), None)
        if ref is not None and not ref.is_meta:
            encoder = encoder.to(ref.device)
        for p in encoder.parameters():
            p.requires_grad_(False)  # the wrapper makes the active adapter's parameters trainable
        encoders(peft_model)[adapter_name] = encoder

    def extra_parameters(self, peft_model: Any, adapter_name: str) -> Iterator[nn.Parameter]:
        bank = peft_model._modules.get("prompt_encoder")
        if bank is not None and adapter_name in bank:
            yield from bank[adapter_name].parameters()

    def delete(self, peft_model: Any, adapter_name: str | None) -> None:
        bank = peft_model._modules.get("prompt_encoder")
        if bank is None:
            return
        if adapter_name is None:
            del peft_model._modules["prompt_encoder"]
        elif adapter_name in bank:
            del bank[adapter_name]

    def check_mergeable(self, config: PLConfigT) -> None:
        raise ValueError(
            f"{config.peft_type} adapters cannot be merged into the model's weights: they add virtual tokens to "
            "every input instead of changing a weight. Keep the adapter loaded (PeftModel) for inference."
        )

    def add_weighted_adapter(
        self, peft_model: Any, adapters: list[str], weights: list[float], adapter_name: str, **kwargs: Any
    ) -> None:
        raise NotImplementedError(
            "Weighted combination is defined for LoRA-style adapters only; soft prompts of different adapters "
            "do not combine linearly in a meaningful way."
        )

    # -- the tensors a prompt-learning adapter adds --------------------------------------
    def virtual_tokens(self, peft_model: Any, adapter_name: str) -> torch.Tensor:
        """The adapter's tensor as saved: (n · submodules, width)."""
        raise NotImplementedError

    # -- files ------------------------------------------------------------------------
    def state_dict(self, peft_model: Any, config: PLConfigT, adapter_name: str) -> dict[str, torch.Tensor]:
        out = {EMBEDDINGS_KEY: self.virtual_tokens(peft_model, adapter_name).detach()}
        model = peft_model.get_base_model()
        params = dict(model.named_parameters())
        for key, path in self.key_map(model, config, adapter_name).items():
            out[HEAD_PREFIX + key] = params[path]
        return out

    def load_state_dict(
        self, peft_model: Any, config: PLConfigT, adapter_name: str, state: dict[str, torch.Tensor]
    ) -> None:
        state = dict(state)
        if EMBEDDINGS_KEY not in state:
            raise ValueError(
                f"The adapter file has no {EMBEDDINGS_KEY!r} tensor (keys: {sorted(state)[:5]}); it is not a "
                f"{config.peft_type} adapter file."
            )
        self.load_virtual_tokens(peft_model, config, adapter_name, state.pop(EMBEDDINGS_KEY))
        heads = {}
        for key, value in state.items():
            # deltatune/PEFT write heads as base_model.<path>; tolerate the layer-method prefix too.
            for prefix in ("base_model.model.", HEAD_PREFIX):
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    break
            heads[key] = value
        model = peft_model.get_base_model()
        copy_checked(self.key_map(model, config, adapter_name), dict(model.named_parameters()), heads)

    def load_virtual_tokens(
        self, peft_model: Any, config: PLConfigT, adapter_name: str, value: torch.Tensor
    ) -> None:
        raise NotImplementedError


def copy_into(param: torch.Tensor, value: torch.Tensor, what: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(
            f"Shape mismatch loading {what}: the file has {tuple(value.shape)}, this model expects "
            f"{tuple(param.shape)}. The adapter was trained with another num_virtual_tokens or on a model of "
            "other dimensions."
        )
    if not param.is_meta:
        with torch.no_grad():
            param.copy_(value.to(dtype=param.dtype, device=param.device))
