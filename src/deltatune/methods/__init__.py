"""One module (or small package) per method family; importing this package registers them all."""

from deltatune.methods import (
    bottleneck,  # noqa: F401  (registers bottleneck adapters)
    ia3,  # noqa: F401  (registers (IA)³)
    lora,  # noqa: F401  (registers LoRA)
    prefix,  # noqa: F401  (registers prefix tuning)
    prompt,  # noqa: F401  (registers prompt tuning)
)
