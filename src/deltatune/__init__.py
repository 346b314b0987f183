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
from deltatune.peft_functions import (
    TunerLayerStatus,
    TunerModelStatus,
    get_layer_status,
    get_model_status,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    load_peft_weights,
    set_peft_model_state_dict,
)
from deltatune.quant import prepare_model_for_kbit_training
from deltatune.quant.loftq import LoftQConfig
from deltatune.task_models import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

__version__ = "0.1.0"

__all__ = [
    "Advice",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "BottleneckConfig",
    "CliRecipe",
    "IA3Config",
    "LoftQConfig",
    "LoraConfig",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TaskType",
    "TunerLayerStatus",
    "TunerModelStatus",
    "__version__",
    "advise",
    "get_layer_status",
    "get_model_status",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "register_method",
    "registered_methods",
    "set_peft_model_state_dict",
]
