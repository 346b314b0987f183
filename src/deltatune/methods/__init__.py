"""One module (or small package) per method family; importing this package registers them all.

The order of the imports is the order in which ``deltatune train --help`` and
``deltatune compare`` list the methods.
"""

# isort: off
from deltatune.methods import lora  # noqa: F401  (registers LoRA, DoRA, QLoRA and LoftQ recipes)
from deltatune.methods import ia3  # noqa: F401  (registers (IA)³)
from deltatune.methods import bottleneck  # noqa: F401  (registers bottleneck adapters)
from deltatune.methods import prompt  # noqa: F401  (registers prompt tuning)
from deltatune.methods import prefix  # noqa: F401  (registers prefix tuning)
# isort: on
