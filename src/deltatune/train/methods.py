"""The CLI's method names, each mapped to a function that turns a base model into a trainable one.

One table entry per method. A method whose code is not in this build of deltatune raises
:class:`MethodUnavailable` with the reason, so ``deltatune compare`` skips it with a message and
picks it up as soon as its code lands — nothing else in the trainer names a method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn


class MethodUnavailable(RuntimeError):
    """The method's code is not part of this deltatune build."""


@dataclass
class MethodEntry:
    name: str
    description: str
    build: Callable[[nn.Module, str, dict[str, Any]], nn.Module]
    default_lr: float
    config: str | None = None  # the config class in ``deltatune`` whose fields --method-arg may set
    extra_args: tuple[str, ...] = ()  # --method-arg keys the build function reads itself

    def valid_args(self) -> list[str]:
        """The keys ``--method-arg`` accepts for this method."""
        names = set(self.extra_args)
        if self.config is not None:
            cls = _need(self.config)
            names |= {f.name for f in dataclasses.fields(cls) if f.init} - _NOT_METHOD_ARGS
        return sorted(names)

    def check_args(self, args: dict[str, Any]) -> None:
        """Refuse --method-arg keys the method does not know (a typo would otherwise be ignored)."""
        if not args:
            return
        valid = self.valid_args()
        unknown = [k for k in args if k not in valid]
        if unknown:
            import difflib

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


# Config fields the trainer sets itself: never through --method-arg.
_NOT_METHOD_ARGS = {"task_type", "peft_type", "base_model_name_or_path", "inference_mode", "revision"}


def _need(attr: str, where: str = "deltatune") -> Any:
    import importlib

    try:
        module = importlib.import_module(where)
    except ImportError as exc:
        raise MethodUnavailable(f"{where} is not part of this deltatune build ({exc})") from exc
    value = getattr(module, attr, None)
    if value is None:
        raise MethodUnavailable(f"{where}.{attr} does not exist in this deltatune build")
    return value


def _fields(cls: Any, opts: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The options that are fields of config class ``cls`` (others belong to other methods)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in opts.items() if k in names and k not in skip and v is not None}


def _lora_config(task_type: str, opts: dict[str, Any], **extra: Any) -> Any:
    cls = _need("LoraConfig")
    r = opts.get("r")
    r = 8 if r is None else r  # an invalid rank (0, -1) reaches LoraConfig, which refuses it
    alpha = opts.get("lora_alpha")
    dropout = opts.get("lora_dropout")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
        raise ValueError(f"lora_alpha must be a number > 0 (default 2 * r), got {alpha!r}.")
    kw = {
        "r": r,
        "lora_alpha": 2 * r if alpha is None else alpha,
        # LoRA on parameters (target_parameters) adds to the weight itself: no input to drop.
        "lora_dropout": (0.0 if opts.get("target_parameters") else 0.05) if dropout is None else dropout,
    }
    kw.update(_fields(cls, opts, skip=("r", "lora_alpha", "lora_dropout", "task_type")))
    kw.update(extra)
    return cls(task_type=task_type, **kw)


def _wrap(model: nn.Module, config: Any) -> nn.Module:
    return _need("get_peft_model")(model, config)


def build_lora(model: nn.Module, task_type: str, opts: dict[str, Any]) -> nn.Module:
    return _wrap(model, _lora_config(task_type, opts))


def build_dora(model: nn.Module, task_type: str, opts: dict[str, Any]) -> nn.Module:
    cls = _need("LoraConfig")
    if "use_dora" not in {f.name for f in dataclasses.fields(cls)}:
        raise MethodUnavailable("LoraConfig has no use_dora field in this deltatune build")
    return _wrap(model, _lora_config(task_type, opts, use_dora=True))


def build_qlora(model: nn.Module, task_type: str, opts: dict[str, Any]) -> nn.Module:
    quantize = _need("quantize_model", "deltatune.quant")
    prepare = _need("prepare_model_for_kbit_training", "deltatune.quant")
    quantize(model)
    prepare(model, use_gradient_checkpointing=bool(opts.get("gradient_checkpointing", False)))
    return _wrap(model, _lora_config(task_type, opts))


def build_loftq(model: nn.Module, task_type: str, opts: dict[str, Any]) -> nn.Module:
    loftq_cls = _need("LoftQConfig", "deltatune.quant")
    bits, iters = opts.get("loftq_bits"), opts.get("loftq_iter")
    loftq = loftq_cls(
        loftq_bits=4 if bits is None else int(bits), loftq_iter=1 if iters is None else int(iters)
    )
    loftq_dict = dataclasses.asdict(loftq) if dataclasses.is_dataclass(loftq) else dict(loftq)  # type: ignore[arg-type]
    return _wrap(model, _lora_config(task_type, opts, init_lora_weights="loftq", loftq_config=loftq_dict))


def _simple(
    config_name: str, defaults: dict[str, Any] | None = None
) -> Callable[[nn.Module, str, dict[str, Any]], nn.Module]:
    def build(model: nn.Module, task_type: str, opts: dict[str, Any]) -> nn.Module:
        cls = _need(config_name)
        kw = dict(defaults or {})
        kw.update(_fields(cls, opts, skip=("task_type",)))
        return _wrap(model, cls(task_type=task_type, **kw))

    return build


def build_full(model: nn.Module, task_type: str, opts: dict[str, Any]) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


METHODS: dict[str, MethodEntry] = {
    e.name: e
    for e in [
        MethodEntry(
            "lora", "LoRA: low-rank A, B beside each targeted linear layer", build_lora, 3e-3, "LoraConfig"
        ),
        MethodEntry(
            "dora", "DoRA: LoRA + a learned magnitude per output row", build_dora, 3e-3, "LoraConfig"
        ),
        MethodEntry("qlora", "QLoRA: LoRA over an NF4 4-bit frozen base", build_qlora, 3e-3, "LoraConfig"),
        MethodEntry(
            "loftq",
            "LoftQ: QLoRA with an init that absorbs the quantisation error",
            build_loftq,
            1e-3,
            "LoraConfig",
            ("loftq_bits", "loftq_iter"),
        ),  # fmt: skip
        MethodEntry(
            "ia3",
            "(IA)3: learned rescaling of keys, values and FFN activations",
            _simple("IA3Config"),
            5e-3,
            "IA3Config",
        ),  # fmt: skip
        MethodEntry(
            "bottleneck",
            "bottleneck adapters after attention / FFN blocks",
            _simple("BottleneckConfig"),
            1e-3,
            "BottleneckConfig",
        ),  # fmt: skip
        MethodEntry(
            "prompt",
            "prompt tuning: trained virtual token embeddings",
            _simple("PromptTuningConfig", {"num_virtual_tokens": 20}),
            3e-2,
            "PromptTuningConfig",
        ),  # fmt: skip
        MethodEntry(
            "prefix",
            "prefix tuning: trained per-layer key/value prefixes",
            _simple("PrefixTuningConfig", {"num_virtual_tokens": 20}),
            1e-2,
            "PrefixTuningConfig",
        ),  # fmt: skip
        MethodEntry("full", "full fine-tuning: every weight trains (baseline)", build_full, 5e-5),
    ]
}


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> MethodEntry:
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose one of {', '.join(METHODS)}.")
    return METHODS[name]


def available_methods() -> dict[str, str | None]:
    """name -> None when its code is present, else the reason it is not (no model needed)."""
    probes = {
        "lora": [("LoraConfig", "deltatune")],
        "dora": [("LoraConfig", "deltatune")],
        "qlora": [
            ("quantize_model", "deltatune.quant"),
            ("prepare_model_for_kbit_training", "deltatune.quant"),
        ],
        "loftq": [("LoftQConfig", "deltatune.quant")],
        "ia3": [("IA3Config", "deltatune")],
        "bottleneck": [("BottleneckConfig", "deltatune")],
        "prompt": [("PromptTuningConfig", "deltatune")],
        "prefix": [("PrefixTuningConfig", "deltatune")],
        "full": [],
    }
    out: dict[str, str | None] = {}
    for name in METHODS:
        try:
            for attr, where in probes.get(name, []):
                _need(attr, where)
            out[name] = None
        except MethodUnavailable as exc:
            out[name] = str(exc)
    return out
