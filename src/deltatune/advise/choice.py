"""The recommendation: which method to train, given every method's estimate, the memory,
the budget and the job, and the ``deltatune train`` command that runs it.
"""

import json
import math
import shlex
from typing import Any

from deltatune.advise.estimate import _estimate, _Spec
from deltatune.advise.inputs import _TASK_TYPE, AdviseError, _meta
from deltatune.advise.results import MethodEstimate, _gb
from deltatune.methods.ia3 import IA3Config
from deltatune.model import get_peft_model


# -- the choice ----------------------------------------------------------------------------------
def _ia3_within_budget(
    config: Any, task: str, opts: dict[str, Any], budget: float
) -> tuple[MethodEstimate, list[str]] | None:
    """(IA)3 on the attention keys / values only (no feed-forward vectors): the smallest (IA)3."""
    probe = get_peft_model(_meta(config, task, opts["dtype"]), IA3Config(task_type=_TASK_TYPE[task]))
    cfg: Any = probe.active_peft_config
    ff = set(cfg.feedforward_modules or [])
    attn = [t for t in cfg.target_modules or [] if t not in ff]
    if not attn:
        return None
    spec = _Spec(
        "ia3 (keys, values)",
        "ia3",
        "ia3",
        lambda tt, o: IA3Config(task_type=tt, target_modules=attn, feedforward_modules=[]),
        {"method_args": {"target_modules": attn, "feedforward_modules": []}},
    )
    est = _estimate(config, task, spec, opts)
    est.within_budget = est.trainable_params <= budget * est.all_params
    return (est, attn) if est.within_budget else None


def _pick(
    advice_estimates: list[MethodEstimate], opts: dict[str, Any]
) -> tuple[MethodEstimate, str, list[str]]:
    est = {e.method: e for e in advice_estimates if e.error is None}
    notes: list[str] = []

    def usable(name: str) -> MethodEstimate | None:
        e = est.get(name)
        return e if e is not None and (e.fits or (e.fix is not None and e.fixed_memory is not None)) else None

    def how(e: MethodEstimate) -> str:
        if e.fits:
            return f"fits in {_gb(opts['memory'])} per device as asked ({_gb(e.memory.total)})"
        assert e.fixed_memory is not None
        return f"fits once you {e.fix} ({_gb(e.fixed_memory.total)} per device)"

    prompt = next((e for e in est.values() if e.train_method == "prompt"), None)
    if opts["no_weights"] and prompt is not None:
        return (
            prompt,
            "no access to the weights: prompt tuning changes no weight, only "
            f"{prompt.trainable_params:,} virtual-token parameters; it works best on large models (≥ 10B). "
            "Training a soft prompt still needs the weights to run forward and backward through the frozen "
            "model; with API-only access (no weights at all) only hard (text) prompts are possible",
            notes,
        )
    if opts["budget"] is not None and opts["budget"] < 1e-4:
        budget = opts["budget"]
        ia3 = est.get("ia3")
        if ia3 is not None and ia3.trainable_params <= budget * ia3.all_params:
            return (
                ia3,
                f"parameter budget {budget:.4%}: (IA)3 trains {ia3.trainable_percent:.4f}%, and merges away",
                notes,
            )
        small = opts.get("_ia3_small")
        if small is not None:
            e, attn = small
            notes.append(
                f"(IA)3 with its default targets trains {ia3.trainable_percent if ia3 else float('nan'):.4f}%, "
                f"over the budget; on {', '.join(attn)} only it trains {e.trainable_percent:.4f}%"
            )
            return (
                e,
                f"parameter budget {budget:.4%}: (IA)3 on {', '.join(attn)} is within it and merges away",
                notes,
            )
        if prompt is not None and prompt.trainable_params <= budget * prompt.all_params:
            return prompt, f"parameter budget {budget:.4%}: only prompt tuning is within it", notes
    lora16 = usable("lora r=16")
    qlora = usable("qlora r=16")
    if opts["adapters"] > 1:
        for cand in (lora16, qlora):
            if cand is not None:
                file = cand.adapter_file_bytes
                return (
                    cand,
                    f"{opts['adapters']} adapters on one base: keep LoRA unmerged and serve them from one base "
                    f"model through the adapter store (each adapter file {file / 2**20:.0f} MB, all "
                    f"{opts['adapters']} {_gb(file * opts['adapters'])}); {how(cand)}",
                    notes,
                )
    full = usable("full fine-tuning")
    if opts["max_quality"] and full is not None:
        return full, f"maximum quality regardless of cost: full fine-tuning {how(full)}", notes
    lora_fits = est.get("lora r=16")
    if lora_fits is not None and lora_fits.fits:
        return (
            lora_fits,
            f"standard fine-tuning: LoRA r=16 on all linear layers, {lora_fits.trainable_params:,} trainable "
            f"parameters ({lora_fits.trainable_percent:.4f}%), {how(lora_fits)}; merges into the base with no "
            "inference overhead",
            notes,
        )
    q = est.get("qlora r=16")
    if q is not None and (q.fits or (q.fixed_memory is not None and "needs" not in (q.fix or ""))):
        lora_need = lora_fits.fix if lora_fits is not None else "unknown"
        return (
            q,
            f"LoRA on the {opts['precision']} base does not fit as asked ({lora_need}); the 4-bit NF4 base of "
            f"QLoRA {how(q)}, same {q.trainable_params:,} trainable parameters",
            notes,
        )
    if lora16 is not None and lora16.fixed_memory is not None and "needs" not in (lora16.fix or ""):
        return lora16, f"LoRA r=16 {how(lora16)}", notes
    if q is not None:
        return (
            q,
            f"too large for {_gb(opts['memory'])} per device even with a 4-bit base: QLoRA "
            f"{q.fix} ({_gb(q.fixed_memory.total) if q.fixed_memory else '?'} per device), or a device with at "
            f"least {_gb(q.memory_checkpointed.total)} of memory",
            notes,
        )
    for e in est.values():  # only some methods were asked for
        if usable(e.method) is not None:
            return e, f"of the methods estimated, {e.method} {how(e)}", notes
    if est:
        e = next(iter(est.values()))
        return e, f"none of the methods estimated fits; {e.method}: {e.fix}", notes
    raise AdviseError(
        "no method could be estimated for this model: "
        + "; ".join(f"{e.method}: {e.error}" for e in advice_estimates if e.error)
    )


def _command(e: MethodEstimate, opts: dict[str, Any]) -> str:
    parts = ["deltatune", "train", "--method", e.train_method]
    if opts["model_path"]:
        parts += ["--model", opts["model_path"]]
    if opts["task"] in ("causal_lm", "seq_cls", "seq2seq"):
        parts += ["--task", opts["task"]]
    for key, value in e.train_args.items():
        if key == "method_args":
            for k, v in value.items():
                parts += ["--method-arg", f"{k}={json.dumps(v, separators=(',', ':'))}"]
        elif key == "target_modules":
            parts += ["--method-arg", f"target_modules={value}"]
        else:
            parts += ["--" + key.replace("_", "-"), str(value)]
    mem = e.fixed_memory or e.memory
    parts += ["--max-length", str(opts["seq_len"]), "--batch-size", str(mem.batch_size)]
    if mem.batch_size < opts["batch_size"]:
        parts += ["--grad-accum", str(math.ceil(opts["batch_size"] / mem.batch_size))]
    if mem.gradient_checkpointing:
        parts.append("--gradient-checkpointing")
    if opts["precision"] in ("bf16", "fp16"):
        parts += ["--mixed-precision", opts["precision"]]
    if mem.devices > 1 or opts["devices"] > 1:
        n = max(mem.devices, opts["devices"])
        parts = ["torchrun", "--nproc_per_node", str(n), "-m", "deltatune.cli", *parts[1:]]
        if mem.devices > 1:
            parts.append("--fsdp")
    return shlex.join(parts)
