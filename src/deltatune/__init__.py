"""deltatune: parameter-efficient fine-tuning for PyTorch and Hugging Face transformers."""

from deltatune import (
    methods,  # noqa: F401  (registers every method)
    quant,  # noqa: F401  (4-bit bases for adapters; the LoftQ initialisation of LoRA)
)
from deltatune.advise import Advice, advise
from deltatune.config import CliRecipe, PeftConfig, PeftType, TaskType, register_method, registered_methods
from deltatune.methods.bottleneck import BottleneckConfig
from deltatune.methods.ia3 import IA3Config
from deltatune.methods.lora import LoraConfig
from deltatune.methods.prefix import PrefixTuningConfig
from deltatune.methods.prompt import PromptTuningConfig, PromptTuningInit
from deltatune.model import PeftModel, get_peft_model
from deltatune.quant.loftq import LoftQConfig

__version__ = "0.1.0"

__all__ = [
    "Advice",
    "BottleneckConfig",
    "CliRecipe",
    "IA3Config",
    "LoftQConfig",
    "LoraConfig",
    "PeftConfig",
    "PeftModel",
    "PeftType",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TaskType",
    "__version__",
    "advise",
    "get_peft_model",
    "register_method",
    "registered_methods",
]
