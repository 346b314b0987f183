"""One module per method family; importing this package registers them all."""

from deltatune.methods import (
    bottleneck,  # noqa: F401  (registers bottleneck adapters)
    ia3,  # noqa: F401  (registers (IA)³)
    lora,  # noqa: F401  (registers LoRA)
)
