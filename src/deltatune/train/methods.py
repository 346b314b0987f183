"""The CLI's method names (``deltatune train --method``), each a function that turns a base
model into a trainable one.

Every method's recipes come from the method registry (``deltatune.config.register_method``):
registering a method with a :class:`~deltatune.config.CliRecipe` makes it trainable here, in
``deltatune compare`` and in ``--help``. ``full`` (every weight trains) is the baseline that is
no adapter method.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from deltatune.config import CliRecipe, MethodSpec, PeftConfig, cli_recipes
from deltatune.model import get_peft_model
from deltatune.quant import load_quantized, prepare_model_for_kbit_training, quantize_model, streams_loftq

# Config fields the trainer sets itself: never through --method-arg.
_NOT_METHOD_ARGS = {"task_type", "peft_type", "base_model_name_or_path", "inference_mode", "revision"}


@dataclass
class MethodEntry:
    name: str
    description: str
    build: Callable[[nn.Module, str, dict[str, Any]], nn.Module]
    default_lr: float
    config_cls: type[PeftConfig] | None = None  # the config whose fields --method-arg may set
    extra_args: tuple[str, ...] = ()  # --method-arg keys the build function reads itself
    # How the base model is read from its folder: (model class, path, task type, the run's
    # method options, **from_pretrained kwargs); None: ``model_class.from_pretrained``.
    load_base: Callable[..., nn.Module] | None = None

    def valid_args(self) -> list[str]:
        """The keys ``--method-arg`` accepts for this method."""
        names = set(self.extra_args)
        if self.config_cls is not None:
            names |= {f.name for f in dataclasses.fields(self.config_cls) if f.init} - _NOT_METHOD_ARGS
        return sorted(names)

    def check_args(self, args: dict[str, Any]) -> None:
        """Refuse --method-arg keys the method does not know (a typo would otherwise be ignored)."""
        if not args:
            return
        valid = self.valid_args()
        unknown = [k for k in args if k not in valid]
        if unknown:
            hints = [
                f"{k!r} (did you mean {close[0]!r}?)"
                if (close := difflib.get_close_matches(k, valid, 1))
                else repr(k)
                for k in unknown
            ]
            allowed = ", ".join(valid) if valid else "none (this method takes no --method-arg)"
            raise ValueError(
                f"--method-arg {', '.join(hints)}: not an option of method {self.name!r}. Valid keys: {allowed}."
            )


def build_config(spec: MethodSpec, recipe: CliRecipe, task_type: str, opts: dict[str, Any]) -> PeftConfig:
    """The method's config from the run's options (see :class:`~deltatune.config.CliRecipe`)."""
    names = {f.name for f in dataclasses.fields(spec.config_cls)}
    kw = dict(recipe.config_defaults)
    kw.update({k: v for k, v in opts.items() if k in names and k != "task_type" and v is not None})
    if recipe.options is not None:
        kw.update(recipe.options(opts))
    return spec.config_cls(task_type=task_type, **kw)


def _recipe_entry(spec: MethodSpec, recipe: CliRecipe) -> MethodEntry:
    def in_4bit(config: PeftConfig) -> bool:  # 4-bit LoftQ trains on an NF4 base, like QLoRA
        return recipe.quantize_base or streams_loftq(config)

    def load_base(model_class: Any, path: str, task_type: str, opts: dict[str, Any], **kw: Any) -> nn.Module:
        """QLoRA and 4-bit LoftQ stream the folder straight into NF4 (LoftQ's factors computed on
        the way): the full-precision model never exists in memory, and the build's
        ``quantize_model`` finds nothing left to quantise."""
        config = build_config(spec, recipe, task_type, opts)
        if not in_4bit(config):
            return model_class.from_pretrained(path, **kw)  # type: ignore[no-any-return]
        loftq = config if streams_loftq(config) else None
        return load_quantized(path, model_class=model_class, lora_config=loftq, **kw)

    def build(model: nn.Module, task_type: str, opts: dict[str, Any]) -> nn.Module:
        config = build_config(spec, recipe, task_type, opts)
        if in_4bit(config):
            quantize_model(model)
            prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=bool(opts.get("gradient_checkpointing", False))
            )
        return get_peft_model(model, config)

    return MethodEntry(
        recipe.name,
        recipe.description,
        build,
        recipe.default_lr,
        spec.config_cls,
        recipe.extra_args,
        load_base,
    )


def build_full(model: nn.Module, task_type: str, opts: dict[str, Any]) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


FULL = MethodEntry("full", "full fine-tuning: every weight trains (baseline)", build_full, 5e-5)


class _Methods(Mapping[str, MethodEntry]):
    """The CLI's methods by name, read from the registry at each use (so a method registered
    after import is there too), then ``full``."""

    def _entries(self) -> dict[str, MethodEntry]:
        out = {name: _recipe_entry(spec, recipe) for name, (spec, recipe) in cli_recipes().items()}
        out[FULL.name] = FULL
        return out

    def __getitem__(self, name: str) -> MethodEntry:
        return self._entries()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries())

    def __len__(self) -> int:
        return len(self._entries())


METHODS: Mapping[str, MethodEntry] = _Methods()


def get_method(name: str) -> MethodEntry:
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose one of {', '.join(METHODS)}.")
    return METHODS[name]


def available_methods() -> dict[str, str | None]:
    """Every CLI method by name, each mapped to None: a registered method is always available
    (callers that skip methods with a reason see none)."""
    return dict.fromkeys(METHODS)
