"""Configs, task types and the method registry.

A method registers itself once with :func:`register_method`: its ``peft_type``, its config
class, its tuner (the object that injects, saves and loads it) and its command-line recipes.
The wrapper model and the trainer look methods up here and never learn their names.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from deltatune import integrations
from deltatune.io import CONFIG_NAME, open_snapshot, parse_json_object, shorten

if TYPE_CHECKING:
    from deltatune.methods.base import Tuner


class TaskType(str, enum.Enum):
    """What the wrapped model is for; decides the default trainable head and forward."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    SEQ_CLS = "SEQ_CLS"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


class PeftType(str, enum.Enum):
    """The built-in methods' names as written in ``adapter_config.json`` (the ecosystem's spelling).

    A method added later registers any other name; the registry, not this enum, is the list."""

    LORA = "LORA"
    IA3 = "IA3"
    BOTTLENECK = "BOTTLENECK"
    PROMPT_TUNING = "PROMPT_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"

    def __str__(self) -> str:
        return self.value


# Heads that a task type adds freshly initialised on top of a pretrained body; they are
# trained and saved with the adapter.
TASK_HEADS: dict[str, list[str]] = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}


@dataclass
class PeftConfig:
    """Fields shared by every method's config."""

    task_type: str | None = None
    peft_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    # Written for readers (e.g. PEFT) that check which version produced a file.
    peft_version: str | None = None
    auto_mapping: dict | None = None

    # Methods that act on the forward (prompt/prefix tuning) rather than on layers set this.
    @property
    def is_prompt_learning(self) -> bool:
        return False

    def __post_init__(self) -> None:
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        if self.task_type is not None and self.task_type not in TaskType._value2member_map_:
            raise ValueError(
                f"task_type={self.task_type!r} is not a task type deltatune knows; "
                f"use one of {[t.value for t in TaskType]}."
            )
        integrations.enable()  # TRL's trainers then accept this config as peft_config=

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, set):
                value = sorted(value)
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):
                value = dataclasses.asdict(value)
            elif isinstance(value, enum.Enum):
                value = value.value
            out[f.name] = value
        return out

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        from deltatune.io import atomic_write_text

        os.makedirs(directory, exist_ok=True)
        atomic_write_text(
            os.path.join(directory, CONFIG_NAME), json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        )

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build a config, warning about (and dropping) keys this version does not know."""
        known = {f.name for f in dataclasses.fields(cls)}
        # Fields other libraries write at an inert value (None, False, empty) change nothing:
        # drop them quietly, and warn only about settings that would have had an effect.
        unknown = sorted(k for k in data if k not in known and not _inert(k, data[k]))
        if unknown:
            warnings.warn(
                f"{cls.__name__}: ignoring config keys this version of deltatune does not know: "
                f"{[shorten(k, 80) for k in unknown[:20]]}{f' and {len(unknown) - 20} more' if len(unknown) > 20 else ''}. They come from a newer or different library; the adapter is loaded without them.",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> PeftConfig:
        """Read ``adapter_config.json`` and return the config class its ``peft_type`` names."""
        # Read as untrusted input: a regular file inside the folder, bounded size, UTF-8 JSON object.
        snapshot = open_snapshot(os.fspath(directory), weights=False)
        path = os.path.join(os.fspath(directory), CONFIG_NAME)
        if snapshot.config_text is None:
            raise FileNotFoundError(
                f"No {CONFIG_NAME} in {os.fspath(directory)!r}: this folder holds no saved adapter. "
                "Pass the folder that save_pretrained() wrote."
            )
        data = parse_json_object(snapshot.config_text, path)
        return config_from_dict(data)


C = TypeVar("C", bound=PeftConfig)

# Keys whose value is irrelevant while the feature they configure is off.
_INERT_KEYS = {"qalora_group_size", "ensure_weight_tying"}


def _inert(key: str, value: Any) -> bool:
    return key in _INERT_KEYS or value is None or value is False or value in ({}, [], "")


@dataclass(frozen=True)
class CliRecipe:
    """One way to train a method from the command line: ``deltatune train --method <name>``.

    The trainer builds the method's config from the run's options: ``config_defaults`` first,
    then every option that is a field of the config class (``--method-arg key=value``, ``--r``,
    ...), then what ``options`` returns (a method's own translation of the options, e.g.
    LoRA's lora_alpha = 2 r by default; it wins). ``extra_args`` are ``--method-arg`` keys that
    ``options`` reads and that are no config field. ``quantize_base``: quantise the base
    model's linear layers to NF4 first (QLoRA).
    """

    name: str
    description: str
    default_lr: float
    config_defaults: Mapping[str, Any] = field(default_factory=dict)
    options: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    extra_args: tuple[str, ...] = ()
    quantize_base: bool = False


@dataclass(frozen=True)
class MethodSpec:
    """Everything the library and the CLI need to know about a registered method."""

    peft_type: str
    config_cls: type[PeftConfig]
    tuner_cls: type[Tuner[Any]]
    cli: tuple[CliRecipe, ...] = ()
    tuner: Tuner[Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tuner", self.tuner_cls())  # tuners hold no state: one per method


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    peft_type: str,
    config_cls: type[PeftConfig],
    tuner_cls: type[Tuner[Any]],
    *,
    cli: Sequence[CliRecipe] = (),
) -> MethodSpec:
    """Make a method known to the library and the CLI, once.

    ``peft_type`` is the name written in ``adapter_config.json``; ``config_cls`` sets it in its
    ``__post_init__``; ``tuner_cls`` injects, saves and loads the method (``methods.base.Tuner``);
    ``cli`` names the method's ``deltatune train --method`` recipes. A type or CLI name that is
    already registered is refused.
    """
    key = str(peft_type)
    if key in _REGISTRY:
        spec = _REGISTRY[key]
        raise ValueError(
            f"A method with peft_type {key!r} is already registered ({spec.config_cls.__name__}, "
            f"{spec.tuner_cls.__name__}); pick another peft_type for {config_cls.__name__}."
        )
    taken = {r.name: spec.peft_type for spec in _REGISTRY.values() for r in spec.cli}
    names = [r.name for r in cli]
    clash = sorted({n for n in names if n in taken or names.count(n) > 1})
    if clash:
        raise ValueError(f"CLI method name(s) {clash} are already taken; pick others for {key!r}.")
    spec = MethodSpec(key, config_cls, tuner_cls, tuple(cli))
    _REGISTRY[key] = spec
    return spec


def cli_recipes() -> dict[str, tuple[MethodSpec, CliRecipe]]:
    """Every registered CLI recipe by its ``--method`` name, in registration order."""
    return {r.name: (spec, r) for spec in _REGISTRY.values() for r in spec.cli}


def method_for(config_or_type: PeftConfig | str) -> MethodSpec:
    """The registered method of a config (by its ``peft_type``) or of a ``peft_type`` string."""
    key = config_or_type if isinstance(config_or_type, str) else config_or_type.peft_type
    if key is None or str(key) not in _REGISTRY:
        raise ValueError(
            f"Unknown PEFT method {key!r}. deltatune knows: {sorted(_REGISTRY)}. "
            "Check the 'peft_type' field of the adapter config, or upgrade deltatune if the "
            "adapter was made with a method added later."
        )
    return _REGISTRY[str(key)]


def registered_methods() -> list[str]:
    return sorted(_REGISTRY)


def config_from_dict(data: dict[str, Any]) -> PeftConfig:
    if not isinstance(data, dict):
        raise ValueError(
            f'An adapter config must be a JSON object ({{"peft_type": ..., ...}}), but this one is a '
            f"{type(data).__name__}: {str(data)[:80]}. The {CONFIG_NAME} is corrupt or not an adapter config; "
            "save the adapter again, or restore the file from its source."
        )
    spec = method_for(str(data.get("peft_type")))
    return spec.config_cls.from_dict(data)


def field_list(default: list[str] | None = None) -> Any:
    """A dataclass field holding a fresh list (or None) per instance."""
    return field(default_factory=lambda: None if default is None else list(default))
