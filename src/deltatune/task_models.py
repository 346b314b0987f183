"""PEFT's per-task classes: ``PeftModelFor<Task>`` and ``AutoPeftModelFor<Task>``.

``get_peft_model`` and ``PeftModel.from_pretrained`` return the ``PeftModelFor<Task>`` class of
the config's ``task_type`` (a plain :class:`~deltatune.model.PeftModel` when it has none), as PEFT
does. The classes add no behaviour: the wrapper already runs each task's forward and
``generate``. Their names matter to other libraries: transformers' ``pipeline()`` accepts an
adapter model when its class is named ``PeftModelForCausalLM`` (text generation),
``PeftModelForSequenceClassification`` (text classification), and so on.

``AutoPeftModelFor<Task>.from_pretrained(adapter_folder)`` loads the base model named by the
folder's ``base_model_name_or_path`` with the matching transformers ``AutoModelFor<Task>`` class,
then the adapter::

    adapter_config.json ──base_model_name_or_path──▶ AutoModelForCausalLM.from_pretrained(...)
                        └──────────────────────────▶ PeftModelForCausalLM.from_pretrained(base, folder)
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from torch import nn

from deltatune.config import PeftConfig, TaskType
from deltatune.model import TASK_MODEL_CLASSES, PeftModel
from deltatune.peft_compat import adapter_dir
from deltatune.untrusted import read_config

__all__ = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
]


class PeftModelForCausalLM(PeftModel):
    """A :class:`~deltatune.model.PeftModel` for ``task_type="CAUSAL_LM"`` (decoder-only LMs)."""


class PeftModelForSeq2SeqLM(PeftModel):
    """A :class:`~deltatune.model.PeftModel` for ``task_type="SEQ_2_SEQ_LM"`` (T5, BART, ...)."""


class PeftModelForSequenceClassification(PeftModel):
    """A :class:`~deltatune.model.PeftModel` for ``task_type="SEQ_CLS"`` (its head trains too)."""


class PeftModelForTokenClassification(PeftModel):
    """A :class:`~deltatune.model.PeftModel` for ``task_type="TOKEN_CLS"`` (its head trains too)."""


class PeftModelForQuestionAnswering(PeftModel):
    """A :class:`~deltatune.model.PeftModel` for ``task_type="QUESTION_ANS"`` (extractive QA)."""


class PeftModelForFeatureExtraction(PeftModel):
    """A :class:`~deltatune.model.PeftModel` for ``task_type="FEATURE_EXTRACTION"`` (embeddings)."""


_BY_TASK: dict[str, tuple[type[PeftModel], str]] = {
    TaskType.CAUSAL_LM.value: (PeftModelForCausalLM, "AutoModelForCausalLM"),
    TaskType.SEQ_2_SEQ_LM.value: (PeftModelForSeq2SeqLM, "AutoModelForSeq2SeqLM"),
    TaskType.SEQ_CLS.value: (PeftModelForSequenceClassification, "AutoModelForSequenceClassification"),
    TaskType.TOKEN_CLS.value: (PeftModelForTokenClassification, "AutoModelForTokenClassification"),
    TaskType.QUESTION_ANS.value: (PeftModelForQuestionAnswering, "AutoModelForQuestionAnswering"),
    TaskType.FEATURE_EXTRACTION.value: (PeftModelForFeatureExtraction, "AutoModel"),
}
TASK_MODEL_CLASSES.update({task: cls for task, (cls, _) in _BY_TASK.items()})

# Keywords of from_pretrained that are the adapter's; every other one goes to the base model's loader.
_ADAPTER_KWARGS = frozenset(
    {"autocast_adapter_dtype", "ephemeral_gpu_offload", "low_cpu_mem_usage", "key_mapping", "allow_pickle"}
)


class AutoPeftModel:
    """Load a saved adapter together with its base model: ``AutoPeftModelForCausalLM.from_pretrained(folder)``.

    The folder's ``adapter_config.json`` names the base model (``base_model_name_or_path``, a local
    folder or a Hub id, which transformers resolves as usual: set ``HF_HUB_OFFLINE=1`` to forbid
    downloads) and the task; the class must match the task, as in PEFT. ``AutoPeftModel`` itself
    serves adapters saved without a task type, whose config names a transformers model class in
    ``auto_mapping``. Keywords other than the adapter's (``is_trainable``, ``adapter_name``,
    ``autocast_adapter_dtype``, ``key_mapping``, ...) go to the base model's ``from_pretrained``
    (``dtype=``, ``quantization_config=``, ``device_map=``, ...).
    """

    _task: ClassVar[str | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(
            f"{type(self).__name__} is not instantiated directly: use "
            f"{type(self).__name__}.from_pretrained(adapter_folder)."
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """The base model of the adapter folder ``pretrained_model_name_or_path`` with the adapter loaded."""
        if revision is not None:
            raise ValueError(
                "revision= is not supported: deltatune loads adapters from local folders only. Download the "
                "adapter first (huggingface_hub.snapshot_download(repo_id, revision=...)) and pass its folder."
            )
        subfolder = kwargs.pop("subfolder", None)
        folder = adapter_dir(pretrained_model_name_or_path, subfolder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"{os.fspath(folder)!r} is not a folder. deltatune loads adapters from local folders: download a "
                "Hub adapter first (huggingface_hub.snapshot_download(repo_id)) and pass the folder it returns."
            )
        # adapter_config.json is untrusted input: read through deltatune.untrusted (size, types, values)
        peft_config = config if config is not None else read_config(folder)
        base_class, peft_class = cls._classes(peft_config)
        base_path = peft_config.base_model_name_or_path
        if not isinstance(base_path, str) or not base_path:
            raise ValueError(
                f"{os.fspath(folder)!r}: its adapter_config.json names no base model (base_model_name_or_path "
                f"is {base_path!r}), so {cls.__name__} cannot know what to load. Load the base model yourself "
                "and call PeftModel.from_pretrained(base_model, folder)."
            )
        adapter_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _ADAPTER_KWARGS}
        base_kwargs = dict(kwargs)
        if peft_config.revision is not None:
            base_kwargs.setdefault("revision", peft_config.revision)
        base = base_class.from_pretrained(base_path, **base_kwargs)
        _fit_vocabulary(base, os.fspath(folder))
        model: PeftModel = peft_class.from_pretrained(
            base, pretrained_model_name_or_path, adapter_name=adapter_name, is_trainable=is_trainable,
            config=peft_config, subfolder=subfolder, **adapter_kwargs,
        )  # fmt: skip
        return model

    @classmethod
    def _classes(cls, config: PeftConfig) -> tuple[Any, type[PeftModel]]:
        """(transformers class that loads the base, deltatune class that wraps it) for ``config``."""
        import transformers

        task = config.task_type
        if cls._task is None:
            if task is not None:
                raise ValueError(
                    f"This adapter was saved for task_type={task!r}: load it with "
                    f"{_auto_name(str(task))}.from_pretrained(...), not AutoPeftModel."
                )
            return _class_from_auto_mapping(config), PeftModel
        if task is not None and str(task) != cls._task:
            raise ValueError(
                f"This adapter was saved for task_type={task!r}, but {cls.__name__} loads {cls._task!r} adapters: "
                f"use {_auto_name(str(task))}.from_pretrained(...)."
            )
        peft_class, auto_name = _BY_TASK[cls._task]
        return getattr(transformers, auto_name), peft_class


def _auto_name(task: str) -> str:
    peft_class, _ = _BY_TASK.get(task, (PeftModel, ""))
    return "Auto" + peft_class.__name__


def _class_from_auto_mapping(config: PeftConfig) -> Any:
    """The transformers model class an adapter without task type names in ``auto_mapping``:
    a class of the ``transformers`` package only (the config is untrusted: nothing is imported)."""
    import transformers

    mapping = config.auto_mapping if isinstance(config.auto_mapping, dict) else {}
    name = mapping.get("base_model_class")
    library = mapping.get("parent_library")
    found = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    from_transformers = isinstance(library, str) and (
        library == "transformers" or library.startswith("transformers.")
    )
    if (
        found is None
        or not from_transformers
        or not isinstance(found, type)
        or not issubclass(found, nn.Module)
    ):
        raise ValueError(
            f"AutoPeftModel cannot tell which model class to load: the adapter config has no task_type and its "
            f"auto_mapping ({mapping!r}) names no transformers model class. Use the AutoPeftModelFor<Task> class "
            "of your task, or load the base model yourself and call PeftModel.from_pretrained(base_model, folder)."
        )
    return found


def _fit_vocabulary(base: Any, folder: str) -> None:
    """Grow the base's embeddings to the tokenizer saved beside the adapter, if it is larger (as
    PEFT does for adapters trained with added tokens)."""
    if not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        return
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if embeddings is None:
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if len(tokenizer) > embeddings.weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))


class AutoPeftModelForCausalLM(AutoPeftModel):
    """Base model (``AutoModelForCausalLM``) and adapter of a ``CAUSAL_LM`` adapter folder."""

    _task = TaskType.CAUSAL_LM.value


class AutoPeftModelForSeq2SeqLM(AutoPeftModel):
    """Base model (``AutoModelForSeq2SeqLM``) and adapter of a ``SEQ_2_SEQ_LM`` adapter folder."""

    _task = TaskType.SEQ_2_SEQ_LM.value


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    """Base model (``AutoModelForSequenceClassification``) and adapter of a ``SEQ_CLS`` adapter folder."""

    _task = TaskType.SEQ_CLS.value


class AutoPeftModelForTokenClassification(AutoPeftModel):
    """Base model (``AutoModelForTokenClassification``) and adapter of a ``TOKEN_CLS`` adapter folder."""

    _task = TaskType.TOKEN_CLS.value


class AutoPeftModelForQuestionAnswering(AutoPeftModel):
    """Base model (``AutoModelForQuestionAnswering``) and adapter of a ``QUESTION_ANS`` adapter folder."""

    _task = TaskType.QUESTION_ANS.value


class AutoPeftModelForFeatureExtraction(AutoPeftModel):
    """Base model (``AutoModel``) and adapter of a ``FEATURE_EXTRACTION`` adapter folder."""

    _task = TaskType.FEATURE_EXTRACTION.value
