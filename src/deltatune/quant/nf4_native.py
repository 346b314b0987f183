"""A compiled NF4 dequantiser for the CPU fast path, built on first use, with a plain fallback.

Turning 4-bit codes into a dense weight is the part of a QLoRA step that is not a GEMM. As
tensor operations it takes four passes over the weight (bytes to indices, an 8-byte gather of
both levels, the block scaling, the cast to bf16); ``nf4_native.c`` does it in one, with the
16 levels in a vector register (AVX-512 or AVX2, plain C elsewhere): on a 2048 x 5632 weight,
one thread, about 4x faster in bf16 and 2x in fp32 (timings in docs/qlora.md). The values are the
same bit for bit (one fp32 multiply, then round-to-nearest-even into bf16, as torch casts).

The C file is compiled once per machine with the system's C compiler (``$CC``, else ``cc``)
and ``-march=native`` into deltatune's cache folder (``$DELTATUNE_HOME/kernels``, see
:func:`deltatune.model_cache.cache_home`), under a name that hashes the source, the compiler's
version and the CPU's feature flags, so an upgraded compiler or a different CPU sharing a
home folder gets its own build. Building takes well under a second and is atomic (a temporary
file renamed into place), so concurrent processes may race harmlessly.

Without a compiler, when a build fails, or with ``DELTATUNE_NATIVE=0``, :func:`dequantize_into`
returns False and the caller uses its tensor-operation path: same values, slower. ctypes
releases the GIL during the call. The kernel runs on the calling thread: split over two
threads it made a two-thread bf16 QLoRA step no faster (1 x 128 and 1 x 512 tokens, 4 layers
of the 2048 x 5632 model), as torch's GEMM threads are still busy-waiting after each GEMM.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import torch

from deltatune.model_cache import cache_home

__all__ = ["FLAGS", "SOURCE", "build", "dequantize_into", "kernel", "load"]

SOURCE = Path(__file__).with_name("nf4_native.c")
FLAGS = ("-O3", "-march=native", "-std=c11", "-ffp-contract=off", "-shared", "-fPIC")
_logger = logging.getLogger(__name__)


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build(dest_dir: Path, flags: tuple[str, ...] = FLAGS) -> Path:
    """Compile ``nf4_native.c`` with ``flags`` into ``dest_dir`` (once; the name is a hash of
    what the build depends on) and return the shared library's path. Raises ``RuntimeError``
    naming the compiler's complaint when there is no compiler or the build fails."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC or install gcc/clang)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"cannot run the C compiler {cc!r}: {exc}") from exc
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), cc, version, " ".join(flags), _cpu_flags()]).encode()
    ).hexdigest()[:16]
    target = dest_dir / f"nf4_native-{key}.so"
    if target.is_file():
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".nf4_native-", suffix=".so", dir=dest_dir)
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise RuntimeError(f"{cc} could not build {SOURCE.name}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: another process sees no library or a whole one
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"building {SOURCE.name} with {cc!r} failed: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(path: Path) -> Any:
    """The kernel function of a built library (see :func:`build`)."""
    fn = ctypes.CDLL(str(path)).dt_nf4_dequantize
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    # packed, n_bytes, block, first_block, absmax, qabsmax, qscale, dyn, offset, group, level, bf16, out
    fn.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ctypes.c_float, i64, ptr, ctypes.c_int, ptr]
    fn.restype = ctypes.c_int
    return fn


@cache
def kernel() -> Any | None:
    """The compiled kernel, built on first call; None when disabled or unavailable (logged once)."""
    if os.environ.get("DELTATUNE_NATIVE", "1") == "0":
        return None
    try:
        return load(build(cache_home() / "kernels"))
    except (RuntimeError, OSError) as exc:
        _logger.info("deltatune: NF4 kernel unavailable, using tensor operations (%s)", exc)
        return None


def _cpu_contiguous(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous()


def dequantize_into(
    weight: Any, first_block: int, out: torch.Tensor, levels: torch.Tensor, dynamic: torch.Tensor, group: int
) -> bool:
    """Write the values of ``weight``'s blocks ``first_block`` .. ``first_block + out.numel() //
    block_size - 1`` into ``out`` (fp32 or bf16, contiguous): ``levels[code] * absmax[block]``.

    ``weight`` is an ``NF4Tensor`` (its ``packed`` codes, ``block_size`` and block statistics
    are read; double-quantised absmax are decoded block by block in the kernel, as
    ``block_absmax()`` decodes them); ``levels`` are the 16 NF4 levels (16,) fp32, ``dynamic``
    the 8-bit map (256,) fp32 and ``group`` the absmax values per 8-bit scale. Returns False,
    writing nothing, when the kernel is not available or the arguments are outside what it
    handles; the caller then takes its tensor-operation path."""
    fn = kernel()
    block = weight.block_size
    n_blocks = out.numel() // block if block > 0 else 0
    double = weight.absmax_scale is not None
    if (
        fn is None
        or out.dtype not in (torch.float32, torch.bfloat16)
        or not _cpu_contiguous(out, out.dtype)
        or block % 2
        or n_blocks * block != out.numel()
        or first_block < 0
        or first_block + n_blocks > weight.absmax.numel()
        or (first_block + n_blocks) * (block // 2) > weight.packed.numel()
        or not _cpu_contiguous(weight.packed, torch.uint8)
        or not _cpu_contiguous(weight.absmax, torch.uint8 if double else torch.float32)
        or not _cpu_contiguous(levels, torch.float32)
        or levels.numel() != 16
        or (double and not _cpu_contiguous(weight.absmax_scale, torch.float32))
        or (double and not _cpu_contiguous(dynamic, torch.float32))
        or (double and dynamic.numel() != 256)
        or (double and (first_block + n_blocks - 1) // group >= weight.absmax_scale.numel())
    ):
        return False
    fn(
        weight.packed.data_ptr() + first_block * (block // 2),
        n_blocks * (block // 2),
        block,
        first_block,
        None if double else weight.absmax.data_ptr(),
        weight.absmax.data_ptr() if double else None,
        weight.absmax_scale.data_ptr() if double else None,
        dynamic.data_ptr() if double else None,
        float(weight.absmax_offset) if double else 0.0,
        group,
        levels.data_ptr(),
        int(out.dtype == torch.bfloat16),
        out.data_ptr(),
    )
    return True
