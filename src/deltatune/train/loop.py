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
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltatune.config import method_for
from deltatune.train import checkpoint as ckpt
from deltatune.train import distributed as dist_utils
from deltatune.train.data import Collator, count_tokens
from deltatune.train.options import TrainConfig, autocast_dtype, lr_lambda
from deltatune.train.report import StepLog, plot_metrics, read_jsonl, save_gathered_adapter, write_jsonl


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
        # Loss scaling for fp16 autocast only; otherwise a disabled scaler passes everything through.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
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
        self.history = [h for h in read_jsonl(self._metrics_path()) if h.get("step", 0) <= self.state.step]
        if self.main:
            write_jsonl(self._metrics_path(), self.history)
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
        log = StepLog(self, show_bar=self.main and not cfg.quiet)
        stopped = False
        while self.state.step < self.total_steps:
            loss = self._step([next(batches) for _ in range(cfg.grad_accum)], log)
            step = self.state.step
            log.after_step(step, loss, float(self.scheduler.get_last_lr()[0]))
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
        log.close()
        seconds = time.perf_counter() - log.start
        final = self._final_evaluation()
        if self.main and cfg.plot:
            plot_metrics(self.history, os.path.join(cfg.output_dir, "plot.png"))
        losses = [h["loss"] for h in self.history if "loss" in h]
        return TrainResult(
            steps=self.state.step,
            train_loss=losses[-1] if losses else float("nan"),
            eval_metrics=final,
            seconds=seconds,
            tokens=log.tokens,
            stopped_early=stopped,
            history=list(self.history),
        )

    def _step(self, group: list[dict[str, torch.Tensor]], log: StepLog) -> torch.Tensor:
        """One optimizer step over ``group`` (grad_accum micro-batches); returns the step's loss
        (a tensor, not synchronised).

        Each micro-batch's mean loss is weighted by its share of the step's loss terms (over all
        processes; DDP then averages), so the step's gradient is that of one big batch.
        """
        cfg = self.config
        items = [loss_items(b["labels"], self.task, self._skip_first) for b in group]
        total = dist_utils.all_reduce_sum([float(sum(items))])[0]
        step_loss = torch.zeros((), device=self.device)
        for k, batch in enumerate(group):
            log.count_tokens(count_tokens(batch) * self.world)
            weight = items[k] * self.world / total if total > 0 else 1.0 / cfg.grad_accum
            with dist_utils.no_sync(self.model, skip=k < cfg.grad_accum - 1), self._autocast():
                out = self.model(**batch, **self._extra_kwargs())
                loss = out.loss * weight
            self.scaler.scale(loss).backward()  # the scaler is a no-op unless fp16 autocast
            step_loss += loss.detach()
            self.state.micro += 1
        self._stop_if_not_finite(step_loss)
        self.scaler.unscale_(self.optimizer)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)  # DTensor-aware under FSDP
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return step_loss

    def _final_evaluation(self) -> dict[str, float]:
        """Evaluate at the end; with early stopping, the best evaluated weights win over the last ones."""
        final = self.evaluate() if self.eval_examples else {}
        if final:
            self._record({"step": self.state.step, **final})
            patience, best = self.config.early_stopping_patience, self.best
            if patience and best is not None and not self._improved(final[self._metric_name()]):
                self._restore_best()
                final = self.evaluate()
                final["restored_best_step"] = float(self.state.best_step or 0)
        return final

    def _stop_if_not_finite(self, loss: torch.Tensor) -> None:
        """Stop before a NaN / inf loss reaches the weights (fp16's scaler skips such steps itself)."""
        if self.scaler.is_enabled():
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
