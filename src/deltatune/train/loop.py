"""The training loop.

One plain loop, no framework underneath::

    for each optimizer step:
        for each of grad_accum micro-batches:      (DDP: all-reduce only on the last one)
            loss = model(**batch).loss / grad_accum     (under autocast when asked)
            loss.backward()
        clip the gradient norm; AdamW step on the trainable parameters; scheduler step
        every eval_every steps: evaluate, maybe stop early; every save_every: checkpoint

The data order is a function of (seed, epoch) alone, and the loop's position is the number of
micro-batches consumed, so a run resumed from a checkpoint (weights, optimizer, scheduler,
RNG, position) continues exactly where the interrupted one was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltatune.config import method_for
from deltatune.train import checkpoint as ckpt
from deltatune.train import distributed as dist_utils
from deltatune.train.data import Collator, count_tokens


def _opt(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its ``--help`` text (the CLI builds its options from these)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every setting of a training run (the run folder keeps a copy as config.yaml)."""

    output_dir: str = _opt("runs/deltatune", "run folder: config, metrics, plot, checkpoints, final adapter")
    epochs: float = _opt(3.0, "passes over the training data (ignored when --max-steps > 0)")
    max_steps: int = _opt(0, "optimizer steps to run; 0 = derive from --epochs")
    batch_size: int = _opt(16, "examples per micro-batch per process")
    grad_accum: int = _opt(1, "micro-batches per optimizer step (gradient accumulation)")
    lr: float = _opt(5e-4, "peak learning rate of AdamW")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    adam_betas: list[float] = _opt([0.9, 0.999], "AdamW betas")
    warmup_ratio: float = _opt(0.06, "fraction of steps with linear warm-up (used when --warmup-steps is 0)")
    warmup_steps: int = _opt(0, "warm-up steps; overrides --warmup-ratio when > 0")
    scheduler: str = _opt(
        "linear", "learning-rate decay after warm-up", choices=["linear", "cosine", "constant"]
    )
    max_grad_norm: float = _opt(1.0, "clip the gradient norm to this; 0 = no clipping")
    mixed_precision: str = _opt(
        "no", "autocast dtype: no, bf16, fp16 (CUDA only), auto (bf16 on a GPU that supports it)",
        choices=["no", "bf16", "fp16", "auto"],
    )  # fmt: skip
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward to save memory")
    eval_every: int = _opt(0, "evaluate every N optimizer steps; 0 = only at the end")
    eval_batch_size: int = _opt(64, "examples per evaluation batch")
    early_stopping_patience: int = _opt(0, "stop after N evaluations without improvement; 0 = never")
    metric: str = _opt(
        "auto", "metric for early stopping / best model: accuracy, loss, or auto (accuracy when known)"
    )
    save_every: int = _opt(0, "write a checkpoint every N optimizer steps; 0 = none")
    keep_checkpoints: int = _opt(2, "checkpoints kept on disk (oldest deleted)")
    resume: bool = _opt(False, "continue from the newest checkpoint in --output-dir")
    overwrite: bool = _opt(
        False, "replace the run already in --output-dir (its adapter, metrics and checkpoints are deleted)"
    )
    seed: int = _opt(42, "seed for initialisation, data order and dropout")
    quiet: bool = _opt(False, "no progress bar: one plain log line every --log-every steps")
    log_every: int = _opt(10, "steps between metric records (and log lines in quiet mode)")
    plot: bool = _opt(True, "write plot.png (loss / metric curves) into the run folder")
    fsdp: bool = _opt(False, "under torchrun: shard parameters and optimizer state with FSDP instead of DDP")

    def __post_init__(self) -> None:
        check_options(self)


def check_device(spec: str) -> torch.device:
    """``--device`` as a torch device that exists here, or a ValueError saying what to pass."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device {spec!r} is not a device name; use cpu, cuda, cuda:1 or mps.") from exc
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--device {spec}: no CUDA device is available here; use --device cpu.")
        if device.index is not None and device.index >= n:
            raise ValueError(
                f"--device {spec}: this machine has {n} CUDA device(s) (cuda:0 to cuda:{n - 1})."
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {spec}: MPS is not available here; use --device cpu.")
    elif device.type != "cpu":
        raise ValueError(f"--device {spec!r}: deltatune trains on cpu, cuda or mps.")
    return device


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(opts: Any) -> None:
    """Refuse option values that cannot work, naming the option (as a CLI flag) and the fix.

    Checked for every field of ``opts`` that it has, so :class:`TrainConfig` and the CLI's
    ``RunOptions`` share it; runs when the dataclass is built (YAML, flags or Python).
    """

    def need(name: str, ok: Callable[[Any], bool], rule: str) -> None:
        if not hasattr(opts, name):
            return
        value = getattr(opts, name)
        if value is None:
            return
        if isinstance(value, bool) or not ok(value):
            raise ValueError(f"{_flag(name)} {value!r}: {rule}.")

    def num(test: Callable[[float], bool]) -> Callable[[Any], bool]:
        return lambda v: isinstance(v, (int, float)) and not math.isnan(v) and test(v)

    def whole(test: Callable[[int], bool]) -> Callable[[Any], bool]:
        return lambda v: isinstance(v, int) and test(v)

    need("epochs", num(lambda v: v > 0), "must be > 0 (or give --max-steps)")
    need("max_steps", whole(lambda v: v >= 0), "must be an integer >= 0 (0 = derive from --epochs)")
    for name in ("batch_size", "grad_accum", "eval_batch_size", "max_length", "num_virtual_tokens"):
        need(name, whole(lambda v: v >= 1), "must be an integer >= 1")
    need("lr", num(lambda v: v > 0), "the learning rate must be > 0")
    need("weight_decay", num(lambda v: v >= 0), "must be >= 0")
    need("warmup_ratio", num(lambda v: 0 <= v < 1), "must be in [0, 1)")
    need("max_grad_norm", num(lambda v: v >= 0), "must be >= 0 (0 = no clipping)")
    for name in ("warmup_steps", "eval_every", "early_stopping_patience", "save_every", "keep_checkpoints"):
        need(name, whole(lambda v: v >= 0), "must be an integer >= 0")
    need("log_every", whole(lambda v: v >= 1), "must be an integer >= 1")
    need("metric", lambda v: v in ("auto", "accuracy", "loss"), "choose auto, accuracy or loss")
    need("eval_fraction", num(lambda v: 0 < v < 1), "must be between 0 and 1 (exclusive), e.g. 0.1")
    need("r", whole(lambda v: v >= 1), "the rank must be an integer >= 1")
    need("lora_alpha", num(lambda v: v > 0), "must be > 0 (default: 2 * r)")
    need("lora_dropout", num(lambda v: 0 <= v < 1), "must be in [0, 1)")
    betas = getattr(opts, "adam_betas", None)
    if betas is not None and (
        len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)
    ):
        raise ValueError(
            f"--adam-betas {','.join(str(b) for b in betas) or '(empty)'}: give two numbers in [0, 1), "
            "e.g. --adam-betas 0.9,0.999."
        )
    device = getattr(opts, "device", None)
    if device is not None:
        check_device(device)
    if getattr(opts, "resume", False) and getattr(opts, "overwrite", False):
        raise ValueError("--resume and --overwrite contradict each other: continue the run, or replace it.")


class NonFiniteLoss(ValueError):
    """The training loss became NaN or infinite."""


@dataclass
class TrainResult:
    steps: int
    train_loss: float
    eval_metrics: dict[str, float]
    seconds: float
    tokens: int
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


def lr_lambda(total: int, warmup: int, kind: str) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at step ``s``: linear warm-up, then decay."""

    def fn(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return fn


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if setting == "no":
        return None
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if setting == "fp16":
        if device.type != "cuda":
            raise ValueError("mixed_precision='fp16' needs a CUDA device; on CPU use 'bf16' or 'no'.")
        return torch.float16
    return torch.bfloat16


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full copies of the trainable parameters by name (FSDP shards are gathered: call on every rank)."""
    return {
        n: dist_utils.full_tensor(p.detach()).clone() for n, p in model.named_parameters() if p.requires_grad
    }


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full tensor into a parameter, or into this rank's shard of an FSDP parameter."""
    local = param.to_local() if hasattr(param, "to_local") else param
    local.copy_(dist_utils.shard_like(value, param))


class Trainer:
    """Trains the trainable parameters of ``model`` (a PeftModel or any HF-style model).

    ``train_examples`` / ``eval_examples`` are token examples (see :func:`deltatune.train.data.encode`),
    ``collator`` turns a list of them into a batch dict passed as ``model(**batch)``; the model
    must return an output with ``.loss`` (transformers models do when ``labels`` is given).
    """

    def __init__(
        self,
        model: nn.Module,
        train_examples: list[dict[str, Any]],
        collator: Collator,
        config: TrainConfig,
        eval_examples: list[dict[str, Any]] | None = None,
        task: str = "seq_cls",
        run_info: dict[str, Any] | None = None,
        device: torch.device | None = None,
    ) -> None:
        if not train_examples:
            raise ValueError("No training examples: the training data is empty.")
        self.config = config
        self.task = task
        self._skip_first = skips_first_label(model, task)
        self.collator = collator
        self.train_examples = train_examples
        self.eval_examples = eval_examples or []
        self.run_info = run_info or {}
        self.device = dist_utils.init(device)
        self.world = dist_utils.world_size()
        self.rank = dist_utils.rank()
        self.raw_model = model.to(self.device)
        if config.gradient_checkpointing:
            enable = getattr(model, "gradient_checkpointing_enable", None)
            if not callable(enable):
                raise ValueError(
                    f"{type(model).__name__} has no gradient_checkpointing_enable(); drop --gradient-checkpointing."
                )
            enable()
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("The model has no trainable parameters: nothing to train.")
        self.model = dist_utils.wrap(model, self.device, fsdp=config.fsdp)
        if dist_utils.is_fsdp(self.model):  # FSDP replaced the parameters by sharded DTensors
            self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=config.lr,
            betas=(config.adam_betas[0], config.adam_betas[1]),
            weight_decay=config.weight_decay,
        )
        global_batch = config.batch_size * self.world
        self.micro_per_epoch = math.ceil(len(train_examples) / global_batch)
        if config.max_steps > 0:
            self.total_steps = config.max_steps
        else:
            self.total_steps = max(1, math.ceil(config.epochs * self.micro_per_epoch / config.grad_accum))
        warmup = config.warmup_steps or int(config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total_steps, warmup, config.scheduler)
        )
        self.amp = autocast_dtype(config.mixed_precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        self.state = ckpt.LoopState()
        self.best: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, Any]] = []
        self.main = self.rank == 0

    # -- data ------------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.config.seed + epoch)
        order = torch.randperm(len(self.train_examples), generator=g).tolist()
        need = self.micro_per_epoch * self.config.batch_size * self.world
        if self.world > 1 and len(order) < need:  # every process gets a full share (wrap around)
            order += order[: need - len(order)]
        return order

    def _micro_batches(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches from position ``start`` on, forever (epochs follow each other)."""
        bs, m = self.config.batch_size, start
        order, epoch = None, -1
        while True:
            e, i = divmod(m, self.micro_per_epoch)
            if e != epoch:
                order, epoch = self._order(e), e
            assert order is not None
            lo = (i * self.world + self.rank) * bs
            idx = order[lo : lo + bs] if self.world > 1 else order[i * bs : (i + 1) * bs]
            yield {
                k: v.to(self.device) for k, v in self.collator([self.train_examples[j] for j in idx]).items()
            }
            m += 1

    # -- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, examples: list[dict[str, Any]] | None = None) -> dict[str, float]:
        """Mean loss (per example / per token) and, for classification, accuracy."""
        examples = self.eval_examples if examples is None else examples
        if not examples:
            return {}
        # DDP: the plain module on this rank's share (no collectives, so shares may differ in
        # size). FSDP: every forward is a collective, so every rank runs every batch.
        fsdp = dist_utils.is_fsdp(self.model)
        model = self.model if fsdp else dist_utils.unwrap(self.model)
        was = model.training
        model.eval()
        bs = self.config.eval_batch_size
        shard = examples[self.rank :: self.world] if self.world > 1 and not fsdp else examples
        loss_sum = weight = correct = count = 0.0
        for lo in range(0, len(shard), bs):
            batch = {k: v.to(self.device) for k, v in self.collator(shard[lo : lo + bs]).items()}
            with self._autocast():
                out = model(**batch, **self._extra_kwargs())
            labels = batch["labels"]
            n = float(loss_items(labels, self.task, self._skip_first))
            if self.task == "seq_cls":
                correct += float((out.logits.argmax(-1) == labels).sum())
                count += n
            loss_sum += float(out.loss) * n
            weight += n
        if not fsdp:
            loss_sum, weight, correct, count = dist_utils.all_reduce_sum([loss_sum, weight, correct, count])
        model.train(was)
        metrics = {"eval_loss": loss_sum / max(weight, 1.0)}
        if self.task == "seq_cls":
            metrics["accuracy"] = correct / max(count, 1.0)
        else:
            metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        return metrics

    def _metric_name(self) -> str:
        if self.config.metric != "auto":
            return "eval_loss" if self.config.metric == "loss" else self.config.metric
        return "accuracy" if self.task == "seq_cls" else "eval_loss"

    def _improved(self, value: float) -> bool:
        best = self.state.best_metric
        if best is None:
            return True
        return value < best if self._metric_name() == "eval_loss" else value > best

    def _extra_kwargs(self) -> dict[str, Any]:
        return {"use_cache": False} if self.task == "causal_lm" else {}

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    # -- checkpoints -----------------------------------------------------------------------
    def _named_trainable(self) -> dict[str, torch.Tensor]:
        return trainable_state(dist_utils.unwrap(self.model))

    def save_checkpoint(self) -> str | None:
        trainable = self._named_trainable()
        opt_state = dist_utils.optimizer_state(self.model, self.optimizer)
        path = None
        if self.main:
            path = ckpt.save_checkpoint(
                self.config.output_dir, trainable, self.optimizer, self.scheduler, self.state,
                keep=self.config.keep_checkpoints, best=self.best, optimizer_state=opt_state,
            )  # fmt: skip
        dist_utils.barrier()
        return path

    def _load_resume_checkpoint(self) -> ckpt.Checkpoint | None:
        """The newest checkpoint, checked against this model and optimizer; nothing is changed yet."""
        path = ckpt.latest_checkpoint(self.config.output_dir)
        if path is None:
            if self.main:
                print(
                    f"--resume: no checkpoint in {self.config.output_dir}/checkpoints; starting from scratch."
                )
            return None
        c = ckpt.load_checkpoint(path)
        self._check_compatible(c)
        return c

    def _check_compatible(self, c: ckpt.Checkpoint) -> None:
        """Name what differs between a checkpoint and this run (parameters, shapes, optimizer groups)."""
        model = dist_utils.unwrap(self.model)
        now = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        saved = {n: tuple(t.shape) for n, t in c.trainable.items()}
        problems = []
        only_saved, only_now = sorted(set(saved) - set(now)), sorted(set(now) - set(saved))
        if only_saved:
            problems.append(
                f"{len(only_saved)} trained parameter(s) this model lacks (e.g. {', '.join(only_saved[:3])})"
            )
        if only_now:
            problems.append(
                f"{len(only_now)} trainable parameter(s) missing from the checkpoint "
                f"(e.g. {', '.join(only_now[:3])})"
            )
        shapes = [
            f"{n}: {saved[n]} saved, {now[n]} now"
            for n in sorted(set(saved) & set(now))
            if saved[n] != now[n]
        ]
        if shapes:
            problems.append(f"{len(shapes)} parameter(s) of another shape (e.g. {'; '.join(shapes[:2])})")
        if not problems and not dist_utils.is_fsdp(self.model):
            groups_saved = [len(g["params"]) for g in c.optimizer.get("param_groups", [])]
            groups_now = [len(g["params"]) for g in self.optimizer.param_groups]
            if groups_saved != groups_now:
                problems.append(
                    f"optimizer parameter groups differ (sizes {groups_saved} saved, {groups_now} now)"
                )
        if problems:
            raise ValueError(
                f"Cannot resume from {c.path}: it was made with another model or method settings "
                f"(--r, --target-modules, --method, --model ...): {'; '.join(problems)}. Resume with the "
                "original settings (see config.yaml in the run folder), or start a new --output-dir."
            )

    def _resume(self, c: ckpt.Checkpoint) -> None:
        path = c.path
        params = dict(dist_utils.unwrap(self.model).named_parameters())
        with torch.no_grad():
            for name, value in c.trainable.items():
                _assign(params[name], value)
        dist_utils.load_optimizer_state(self.model, self.optimizer, c.optimizer)
        self.scheduler.load_state_dict(c.scheduler)
        self._apply_settings_to_optimizer()
        ckpt.set_rng_state(c.rng)
        self.state = c.state
        self.best = c.best
        self.history = [h for h in _read_jsonl(self._metrics_path()) if h.get("step", 0) <= self.state.step]
        if self.main:
            _write_jsonl(self._metrics_path(), self.history)
            print(f"Resumed from {path} (step {self.state.step} of {self.total_steps}).")

    def _apply_settings_to_optimizer(self) -> None:
        """This run's lr, betas and weight decay over those stored with a checkpoint's optimizer
        state (equal unless a resume was allowed to change them): the settings say what trains."""
        cfg = self.config
        fn = self.scheduler.lr_lambdas[0]
        for group in self.optimizer.param_groups:
            group["initial_lr"] = cfg.lr
            group["lr"] = cfg.lr * fn(self.scheduler.last_epoch)
            group["betas"] = (cfg.adam_betas[0], cfg.adam_betas[1])
            group["weight_decay"] = cfg.weight_decay
        self.scheduler.base_lrs = [cfg.lr for _ in self.optimizer.param_groups]
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _clear_previous_run(self) -> None:
        """A fresh start: the old metrics go, and old checkpoints too (else a later --resume would
        continue the old run); :meth:`train` refuses that without ``overwrite``."""
        if ckpt.checkpoint_dirs(self.config.output_dir):  # refused in train() unless overwrite
            import shutil

            shutil.rmtree(os.path.join(self.config.output_dir, "checkpoints"), ignore_errors=True)
        if os.path.exists(self._metrics_path()):
            os.remove(self._metrics_path())

    # -- logging ---------------------------------------------------------------------------
    def _metrics_path(self) -> str:
        return os.path.join(self.config.output_dir, "metrics.jsonl")

    def _record(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if self.main:
            with open(self._metrics_path(), "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    def _write_run_config(self) -> None:
        if not self.main:
            return
        import yaml

        os.makedirs(self.config.output_dir, exist_ok=True)
        info = {"train": dataclasses.asdict(self.config), **self.run_info, "world_size": self.world}
        from deltatune.io import atomic_write_text

        atomic_write_text(
            os.path.join(self.config.output_dir, "config.yaml"), yaml.safe_dump(info, sort_keys=False)
        )

    # -- the loop --------------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        # A resume is checked against the checkpoint before anything in the run folder is written.
        resume_from = self._load_resume_checkpoint() if cfg.resume else None
        stale = [] if cfg.resume else ckpt.checkpoint_dirs(cfg.output_dir)
        if stale and not cfg.overwrite:
            raise ValueError(
                f"{cfg.output_dir} holds checkpoints of an earlier run (up to step {stale[-1][0]}). "
                "Pass --resume to continue it, a new --output-dir, or --overwrite to replace it."
            )
        if resume_from is None:  # a resumed run keeps its record of what it started with
            self._write_run_config()
        if resume_from is not None:
            self._resume(resume_from)
        elif self.main:
            self._clear_previous_run()
        self.model.train()
        batches = self._micro_batches(self.state.micro)
        bar = None
        if self.main and not cfg.quiet:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.total_steps,
                initial=self.state.step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )
        start = time.perf_counter()
        first_step = self.state.step
        step_loss = float("nan")
        tokens = window_tokens = 0
        window_start = start
        loss_acc = torch.zeros((), device=self.device)
        window_loss, window_n = 0.0, 0
        stopped = False
        while self.state.step < self.total_steps:
            # Each micro-batch's mean loss is weighted by its share of the step's loss terms (over
            # all processes; DDP then averages), so the step's gradient is that of one big batch.
            group = [next(batches) for _ in range(cfg.grad_accum)]
            items = [loss_items(b["labels"], self.task, self._skip_first) for b in group]
            total = dist_utils.all_reduce_sum([float(sum(items))])[0]
            for k, batch in enumerate(group):
                n_tok = count_tokens(batch) * self.world
                tokens += n_tok
                window_tokens += n_tok
                weight = items[k] * self.world / total if total > 0 else 1.0 / cfg.grad_accum
                with dist_utils.no_sync(self.model, skip=k < cfg.grad_accum - 1), self._autocast():
                    out = self.model(**batch, **self._extra_kwargs())
                    loss = out.loss * weight
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
                loss_acc += loss.detach()
                self.state.micro += 1
            self._stop_if_not_finite(loss_acc)
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)  # DTensor-aware under FSDP
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.step += 1
            step = self.state.step
            if step % max(1, cfg.log_every) == 0 or step == self.total_steps or bar is not None:
                step_loss = float(loss_acc)  # one sync per step; cheap next to a forward/backward
                window_loss += step_loss
                window_n += 1
            loss_acc.zero_()
            lr = self.scheduler.get_last_lr()[0]
            if step % max(1, cfg.log_every) == 0 or step == self.total_steps:
                now = time.perf_counter()
                mean_loss = window_loss / max(1, window_n)
                if self.world > 1:  # the logged loss is the mean over processes
                    mean_loss = dist_utils.all_reduce_sum([mean_loss])[0] / self.world
                row = {
                    "step": step,
                    "epoch": round(self.state.micro / self.micro_per_epoch, 3),
                    "loss": mean_loss,
                    "lr": lr,
                    "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                }
                self._record(row)
                if cfg.quiet and self.main:
                    eta = (now - start) / max(1, step - first_step) * (self.total_steps - step)
                    print(
                        f"step {step}/{self.total_steps} loss {row['loss']:.4f} lr {lr:.2e} "
                        f"tok/s {row['tokens_per_s']:.0f} eta {eta:.0f}s",
                        flush=True,
                    )
                window_loss, window_n, window_tokens, window_start = 0.0, 0, 0, now
            if bar is not None:
                bar.update(1)
                elapsed = time.perf_counter() - start
                bar.set_postfix(
                    loss=f"{step_loss:.4f}",
                    lr=f"{lr:.2e}",
                    tok_s=f"{tokens / max(elapsed, 1e-9):.0f}",
                    refresh=False,
                )
            if (
                cfg.eval_every
                and step % cfg.eval_every == 0
                and step < self.total_steps
                and self.eval_examples
            ):
                stopped = self._eval_and_maybe_stop(step)
            if cfg.save_every and step % cfg.save_every == 0:
                self.save_checkpoint()
            if stopped:
                break
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - start
        final = self.evaluate() if self.eval_examples else {}
        if final:
            self._record({"step": self.state.step, **final})
            if cfg.early_stopping_patience and self.best is not None:
                value = final[self._metric_name()]
                if not self._improved(value):  # the best evaluated weights win over the last ones
                    self._restore_best()
                    final = self.evaluate()
                    final["restored_best_step"] = float(self.state.best_step or 0)
        if self.main and cfg.plot:
            plot_metrics(self.history, os.path.join(cfg.output_dir, "plot.png"))
        losses = [h["loss"] for h in self.history if "loss" in h]
        return TrainResult(
            steps=self.state.step,
            train_loss=losses[-1] if losses else float("nan"),
            eval_metrics=final,
            seconds=seconds,
            tokens=tokens,
            stopped_early=stopped,
            history=list(self.history),
        )

    def _stop_if_not_finite(self, loss: torch.Tensor) -> None:
        """Stop before a NaN / inf loss reaches the weights (fp16's scaler skips such steps itself)."""
        if self.scaler is not None:
            return
        value = float(loss)
        if self.world > 1:
            value = dist_utils.all_reduce_sum([value])[0]
        if not math.isfinite(value):
            raise NonFiniteLoss(
                f"Training stopped at step {self.state.step + 1}: the loss is {value} (the weights were not "
                "updated with it, and no adapter was saved). Lower --lr, check the data (records with no "
                "token to train on), or use --mixed-precision no."
            )

    def _eval_and_maybe_stop(self, step: int) -> bool:
        metrics = self.evaluate()
        self._record({"step": step, **metrics})
        if self.main and self.config.quiet:
            print("eval " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        value = metrics[self._metric_name()]
        if self._improved(value):
            self.state.best_metric, self.state.best_step, self.state.bad_evals = value, step, 0
            if self.config.early_stopping_patience:
                self.best = self._named_trainable()
            return False
        self.state.bad_evals += 1
        if (
            self.config.early_stopping_patience
            and self.state.bad_evals >= self.config.early_stopping_patience
        ):
            if self.main:
                print(
                    f"Early stopping at step {step}: {self._metric_name()} did not improve for "
                    f"{self.state.bad_evals} evaluations (best {self.state.best_metric:.4f} at step {self.state.best_step})."
                )
            return True
        return False

    def _restore_best(self) -> None:
        assert self.best is not None
        params = dict(dist_utils.unwrap(self.model).named_parameters())
        with torch.no_grad():
            for name, value in self.best.items():
                _assign(params[name], value)

    def save_model(self, path: str) -> None:
        """The final adapter (PeftModel) or model (full fine-tuning), written on rank 0 only."""
        model = dist_utils.unwrap(self.model)
        if dist_utils.is_fsdp(model) and hasattr(model, "peft_config"):
            save_gathered_adapter(model, path, self.main)
        elif self.main:
            model.save_pretrained(path)  # type: ignore[operator]
        dist_utils.barrier()


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    """metrics.jsonl; a torn last line (what a kill mid-write leaves) is dropped."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = [line for line in fh if line.strip()]
    rows = []
    for n, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if n == len(lines) - 1:
                break
            raise ValueError(f"{path}, line {n + 1}: not valid JSON ({exc.msg}).") from exc
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    from deltatune.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def plot_metrics(history: list[dict[str, Any]], path: str) -> bool:
    """Training loss (left) and evaluation metrics (right) against steps, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot.png (pip install matplotlib, or deltatune[default]).")
        return False
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot([h["step"] for h in train], [h["loss"] for h in train], label="train loss")
    if evals:
        axes[0].plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="eval loss")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    key = "accuracy" if any("accuracy" in h for h in evals) else "perplexity"
    if evals:
        axes[1].plot([h["step"] for h in evals], [h.get(key, float("nan")) for h in evals], "o-", color="C2")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel(key)
    axes[1].set_title(f"held-out {key}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def save_gathered_adapter(model: nn.Module, path: str, main: bool) -> None:
    """Save an FSDP-sharded PeftModel's adapter: shards gathered on every rank, files written by rank 0."""
    import copy

    from deltatune.io import WEIGHTS_NAME, atomic_directory, atomic_write_text, save_tensors
    from deltatune.model import _model_card

    name = model.active_adapter  # type: ignore[attr-defined]
    state = {k: dist_utils.full_tensor(v) for k, v in model.get_adapter_state_dict(name).items()}  # type: ignore[operator]
    if not main:
        return
    config: Any = copy.copy(model.peft_config[name])  # type: ignore[index]
    config.inference_mode = True
    with atomic_directory(path) as tmp:
        save_tensors(state, os.path.join(tmp, WEIGHTS_NAME))
        config.save_pretrained(tmp)
        atomic_write_text(os.path.join(tmp, "README.md"), _model_card(config, state))


def loss_items(labels: torch.Tensor, task: str, skip_first: bool) -> int:
    """How many terms the model's mean loss averages over for ``labels``: rows for
    classification; labelled tokens otherwise, without each row's first label when
    ``skip_first`` (see :func:`skips_first_label`). Weighting micro-batches by this makes
    gradient accumulation equal one big batch."""
    if task == "seq_cls":
        return int(labels.shape[0])
    if skip_first:
        labels = labels[..., 1:]
    return int((labels != -100).sum())


def skips_first_label(model: nn.Module, task: str) -> bool:
    """A causal LM predicts token t + 1 from t, so its loss never covers a row's first label,
    unless the model's method puts virtual positions in front of the input."""
    if task != "causal_lm":
        return False
    config = getattr(dist_utils.unwrap(model), "active_peft_config", None)
    return config is None or not method_for(config).tuner_cls.prepends_virtual_tokens


@torch.no_grad()
def evaluate_model(
    model: nn.Module, examples: list[dict[str, Any]], collator: Collator, task: str, batch_size: int = 64
) -> dict[str, float]:
    """Held-out loss (and accuracy for classification) of a model, one process, no training set-up."""
    device = next(model.parameters()).device
    model.eval()
    skip_first = skips_first_label(model, task)
    loss_sum = weight = correct = 0.0
    for lo in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collator(examples[lo : lo + batch_size]).items()}
        out = model(**batch)
        labels = batch["labels"]
        n = float(loss_items(labels, task, skip_first))
        if task == "seq_cls":
            correct += float((out.logits.argmax(-1) == labels).sum())
        loss_sum += float(out.loss) * n
        weight += n
    metrics = {"eval_loss": loss_sum / max(weight, 1.0)}
    if task == "seq_cls":
        metrics["accuracy"] = correct / max(len(examples), 1)
    else:
        metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    return metrics
