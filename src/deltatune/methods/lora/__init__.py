"""LoRA (Hu et al. 2021), rsLoRA and DoRA (Liu et al. 2024).

Where to read what:

- ``layer.py``: the layers; ``Linear.forward_active`` is the formula y = W x + b + s · B A x
- ``dora.py``: DoRA, the variant with a learned magnitude per output row
- ``fast.py``: measured speed paths (same values), and the mixed-batch forward
- ``config.py``: ``LoraConfig``
- ``inits.py``: PiSSA / OLoRA initialisations (LoftQ's is in ``deltatune.quant.loftq``)
- ``arithmetic.py``: ``add_weighted_adapter`` (combining adapters)
- ``tuner.py``: which modules LoRA targets and which layer wraps each
- ``recipes.py``: ``deltatune train --method lora | dora | qlora | loftq``
"""

from deltatune.config import PeftType, register_method
from deltatune.methods.lora import inits  # noqa: F401  (registers PiSSA and OLoRA)
from deltatune.methods.lora.config import LoraConfig
from deltatune.methods.lora.layer import LORA_INIT_FNS, Embedding, Linear, LoraLayer
from deltatune.methods.lora.recipes import RECIPES
from deltatune.methods.lora.tuner import LoraTuner

__all__ = ["LORA_INIT_FNS", "Embedding", "Linear", "LoraConfig", "LoraLayer", "LoraTuner"]

register_method(PeftType.LORA.value, LoraConfig, LoraTuner, cli=RECIPES)
