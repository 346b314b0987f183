"""One module per method family; importing this package registers them all."""

from deltatune.methods import lora  # noqa: F401  (registers LoRA)
