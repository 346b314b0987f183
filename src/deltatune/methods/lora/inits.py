"""Initialisations that derive LoRA's factors from the base weight: PiSSA and OLoRA.

Both also change the base weight (W ← W − s·B A, the part the adapter now carries), exactly
as PEFT does, so a file naming them means the same in both libraries. They register in
``LORA_INIT_FNS`` by their ``init_lora_weights`` value.
"""

from __future__ import annotations

import torch

from deltatune.methods.lora.config import LoraConfig
from deltatune.methods.lora.layer import LORA_INIT_FNS, Linear, dense_weight


def _principal_init(layer: Linear, adapter_name: str, config: LoraConfig, path: str) -> None:
    """PiSSA / OLoRA: A, B from the base weight W's top-r SVD (PiSSA) or QR (OLoRA) factors, and
    W ← W − s·B A, so that the model's output is unchanged and the adapter trains W's principal part.

    PiSSA: W = U S Vᵀ, B = U_r √(S_r/s), A = √(S_r/s) V_rᵀ. OLoRA: W = Q R, B = Q_r, A = R_r.
    Shapes: W (out, in), A (r, in), B (out, r); computed in fp32, W stored back in its dtype.
    """
    init = config.init_lora_weights
    base = layer.base_layer
    w = dense_weight(base)
    if layer.quantized or w.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(
            f"init_lora_weights={init!r} rewrites the base weight of {path!r}, but it is stored as "
            f"{type(base).__name__} ({w.dtype}). Initialise on the unquantised model in float precision."
        )
    if init == "olora" and layer.fan_in_fan_out:
        raise ValueError(
            f"init_lora_weights='olora' on {path!r}, a transposed (GPT-2 Conv1D) layer, is not supported; "
            "use 'pissa' or the default init for it."
        )
    r, s = layer.r[adapter_name], layer.scaling[adapter_name]
    with torch.no_grad():
        dense = w.float().T if layer.fan_in_fan_out else w.float()  # (out, in)
        if init == "pissa":
            u, sv, vh = torch.linalg.svd(dense, full_matrices=False)
            root = (sv[:r] / s).sqrt()
            a, b = root.unsqueeze(1) * vh[:r], u[:, :r] * root
        else:
            q, rr = torch.linalg.qr(dense)
            a, b = rr[:r], q[:, :r]
        dst_a, dst_b = layer.factors(adapter_name)
        dst_a.copy_(a)
        dst_b.copy_(b)
        residual = dense - s * (b @ a)
        w.copy_((residual.T if layer.fan_in_fan_out else residual).to(w.dtype))


LORA_INIT_FNS["pissa"] = _principal_init
LORA_INIT_FNS["olora"] = _principal_init
