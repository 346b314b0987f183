"""torchrun on CPU (gloo): 2 processes with DDP or FSDP give the same adapter as 1 process, same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

TESTS = os.path.dirname(os.path.abspath(__file__))

SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
import torch
from deltatune import LoraConfig, get_peft_model
from deltatune.train.data import Collator, DataSpec, encode
from deltatune.train.loop import Trainer, TrainConfig
from train_utils import tiny_bert_cls, tokenizer, toy_cls_records

out, batch, fsdp = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
torch.set_num_threads(1)
tok = tokenizer()
train, _ = encode(toy_cls_records(32, seed=1), tok, DataSpec(task="seq_cls"))
model = get_peft_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
cfg = TrainConfig(output_dir=out, quiet=True, log_every=100, plot=False, batch_size=batch, lr=1e-2,
                  max_steps=6, grad_accum=2, fsdp=fsdp, save_every=3)
trainer = Trainer(model, train, Collator(tok.pad_token_id, "seq_cls"), cfg, train[:12])
result = trainer.train()
trainer.save_model(os.path.join(out, "adapter"))
open(os.path.join(out, f"rank{{trainer.rank}}-of-{{trainer.world}}.done"), "w").write(str(result.eval_metrics["eval_loss"]))
"""


def _free_port() -> int:
    """A port nobody listens on now: back-to-back launches on torchrun's fixed default port can
    collide with the previous run's socket, or with another test run on the same machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(tmp_path, name: str, nproc: int, batch: int, fsdp: bool) -> tuple[dict[str, torch.Tensor], str]:
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT.format(tests=TESTS))
    out = str(tmp_path / name)
    prefix = (
        [sys.executable]
        if nproc == 1
        else [
            *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)),
            *("--master_addr", "127.0.0.1", "--master_port", str(_free_port())),
        ]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [*prefix, str(script), out, str(batch), "1" if fsdp else "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors")), proc.stdout


@pytest.mark.slow
def test_ddp_and_fsdp_match_one_process_with_the_same_global_batch(tmp_path):
    one, _ = _launch(tmp_path, "one", 1, 8, False)
    ddp, _ = _launch(tmp_path, "ddp", 2, 4, False)
    fsdp, _ = _launch(tmp_path, "fsdp", 2, 4, True)
    for name in ("ddp", "fsdp"):  # both ranks ran to the end and agree on the held-out loss
        losses = [float((tmp_path / name / f"rank{r}-of-2.done").read_text()) for r in (0, 1)]
        assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    b_init = torch.zeros(1)
    for other in (ddp, fsdp):
        assert other.keys() == one.keys()
        for k in one:
            assert one[k].shape == other[k].shape  # FSDP's saved adapter is gathered, not a shard
            torch.testing.assert_close(other[k], one[k], atol=1e-5, rtol=1e-4)
    assert any("lora_B" in k and not torch.equal(v, b_init.expand_as(v)) for k, v in one.items())
    assert os.path.isdir(tmp_path / "fsdp" / "checkpoints" / "step-6")  # gathered checkpoint on rank 0
