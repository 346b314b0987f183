"""Serving a store with vLLM: check each adapter folder against vLLM's LoRA rules and build
the ``vllm serve`` command line.

vLLM's rules (``vllm/lora/peft_helper.py`` and ``vllm/config`` LoRAConfig):

- ``r`` ≤ ``--max-lora-rank``, which must be one of 8, 16, 32, 64, 128, 256, 320, 512;
- no DoRA (``use_dora``): "vLLM does not yet support DoRA";
- ``modules_to_save`` must be empty;
- ``bias`` other than "none" needs ``--enable-lora-bias`` (versions that have it);
- vLLM reads ``r`` and ``lora_alpha`` only, so per-module ``rank_pattern`` / ``alpha_pattern``
  would be served with the wrong scale: such adapters are reported too.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field

from deltatune.io import CONFIG_NAME

VLLM_MAX_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class VllmCheck:
    name: str
    path: str
    rank: int = 0
    problems: list[str] = field(default_factory=list)
    needs_bias: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def check_adapter(name: str, path: str) -> VllmCheck:
    """What vLLM would say about the adapter folder ``path``."""
    result = VllmCheck(name, os.path.abspath(path))
    try:
        with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        result.problems.append(f"cannot read {CONFIG_NAME}: {exc}")
        return result
    if not isinstance(cfg, dict):
        result.problems.append(f"{CONFIG_NAME} is not a JSON object")
        return result
    if cfg.get("peft_type", "LORA") != "LORA":
        result.problems.append(f"vLLM serves LoRA adapters only; this one is {cfg.get('peft_type')}")
        return result
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            result.problems.append(f"missing required field {key!r}")
    r = cfg.get("r")
    result.rank = r if isinstance(r, int) and not isinstance(r, bool) else 0
    if result.rank > max(VLLM_MAX_RANKS):
        result.problems.append(
            f"rank {result.rank} exceeds vLLM's largest --max-lora-rank {max(VLLM_MAX_RANKS)}"
        )
    if cfg.get("use_dora"):
        result.problems.append("DoRA (use_dora) is not supported by vLLM")
    if cfg.get("modules_to_save"):
        result.problems.append(f"vLLM needs modules_to_save to be empty; it is {cfg['modules_to_save']}")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            result.problems.append(
                f"{key} is set; vLLM reads only r and lora_alpha and would scale it wrongly"
            )
    if cfg.get("bias", "none") != "none":
        result.needs_bias = True
    return result


def vllm_command(base: str, adapters: list[VllmCheck], port: int = 8000) -> str | None:
    """The ``vllm serve`` command for the adapters that pass (None when none does)."""
    good = [a for a in adapters if a.ok]
    if not good:
        return None
    top = max(a.rank for a in good)
    max_rank = next(r for r in VLLM_MAX_RANKS if r >= top)
    parts = ["vllm", "serve", base, "--port", str(port), "--enable-lora", "--max-lora-rank", str(max_rank),
             "--max-loras", str(len(good)), "--lora-modules", *(f"{a.name}={a.path}" for a in good)]  # fmt: skip
    if any(a.needs_bias for a in good):
        parts.append("--enable-lora-bias")
    return shlex.join(parts)


def report(base: str, store: str, port: int = 8000) -> tuple[str, int]:
    """Human-readable check of every adapter folder in ``store``, and the exit code (1 if any refused)."""
    checks = [
        check_adapter(n, os.path.join(store, n))
        for n in sorted(os.listdir(store))
        if os.path.isfile(os.path.join(store, n, CONFIG_NAME))
    ]
    lines = []
    for c in checks:
        lines.append(f"{'ok     ' if c.ok else 'REFUSED'} {c.name} (r={c.rank})")
        lines += [f"        - {p}" for p in c.problems]
    cmd = vllm_command(base, checks, port)
    lines.append("")
    lines.append(cmd if cmd else "No adapter in the store can be served by vLLM.")
    return "\n".join(lines), 0 if all(c.ok for c in checks) else 1
