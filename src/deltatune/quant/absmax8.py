"""Double quantisation: the NF4 block scales (absmax) stored again in 8 bits.

The fp32 absmax of a 4-bit weight (one per block of 64 values: 0.5 bits per weight) have their
mean subtracted, then are cut into blocks of 256 and each block is scaled by its own absolute
maximum and replaced by the nearest level of bitsandbytes' signed dynamic 8-bit map::

    absmax (b,) fp32 ──- mean──► blocks (b/256, 256) ──÷ scale──► level index (b,) uint8
                                                    scales (b/256,) fp32, offset () fp32

which brings the statistics to about 0.127 bits per weight. Codes, scales and decoded values
are bit-identical to bitsandbytes' CPU backend (``tests/test_nf4.py``).
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

__all__ = ["ABSMAX_BLOCK_SIZE", "dequantize_absmax", "dynamic_map", "quantize_absmax"]

ABSMAX_BLOCK_SIZE = 256  # absmax values per 8-bit block (one fp32 scale each)


@cache
def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (256,) fp32, sorted, in [-0.993, 1].

    Levels are ``±10**e * m`` for exponents e = -6 .. 0, where the mantissas m are the
    midpoints of an even grid on [0.1, 1] with 2**(e + 6) cells, plus 0 and 1.
    """
    values: list[float] = []
    for i in range(7):
        grid = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (grid[:-1] + grid[1:]) / 2.0
        scale = 10.0 ** (i - 6)
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


@cache
def _dynamic_lut(device: torch.device) -> torch.Tensor:
    """(65536,) int64: index of the dynamic-map level for each of 65536 even bins of [-1, 1].

    bitsandbytes' CPU kernel quantises 8-bit blocks through this table rather than an
    exact nearest-level search; reproducing it keeps the double-quantised absmax identical.
    """
    code = dynamic_map(device)
    mids = 0.5 * (code[:-1] + code[1:])
    centres = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32, device=device)) / 65535.0
    return torch.searchsorted(mids, centres, side="left")  # number of midpoints below


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantisation: absmax (b,) fp32 → codes (b,) uint8, scales (ceil(b/256),) fp32, offset ()."""
    offset = absmax.mean()
    centred = absmax - offset
    b = centred.numel()
    n_blocks = -(-b // ABSMAX_BLOCK_SIZE)
    padded = F.pad(centred, (0, n_blocks * ABSMAX_BLOCK_SIZE - b)).view(n_blocks, ABSMAX_BLOCK_SIZE)
    scale = padded.abs().amax(dim=1)  # zero padding never raises an absmax
    # Same arithmetic as bitsandbytes' CPU kernel: x * (1/absmax), clamp, then one of
    # 65536 even bins of [-1, 1] (index truncated), then a table of levels.
    x = (padded * (1.0 / scale)[:, None]).clamp_(-1.0, 1.0)
    bins = ((x + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int64)
    codes = _dynamic_lut(absmax.device)[bins.clamp_(0, 65535)].to(torch.uint8)
    codes[scale == 0] = 0  # an all-equal block: any code decodes to the offset
    return codes.view(-1)[:b].contiguous(), scale, offset


def dequantize_absmax(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_absmax`: (b,) fp32 = level[code] * scale[block] + offset."""
    b = codes.numel()
    levels = dynamic_map(codes.device)[codes.long()]
    levels = F.pad(levels, (0, scale.numel() * ABSMAX_BLOCK_SIZE - b)).view(-1, ABSMAX_BLOCK_SIZE)
    return (levels * scale[:, None]).view(-1)[:b] + offset
