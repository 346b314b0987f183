"""torchrun on CPU (gloo): 2 processes with DDP or FSDP give the same adapter as 1 process, same global batch.

One ``torchrun`` launch trains with DDP and then with FSDP in the same process group (starting
Python, torch and transformers is most of the cost here); the one-process reference runs in
this test's own process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_utils import train_tiny_classifier

TESTS = os.path.dirname(os.path.abspath(__file__))

SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
from train_utils import train_tiny_classifier

torch.set_num_threads(1)
train_tiny_classifier(sys.argv[1] + "/ddp", 4)
train_tiny_classifier(sys.argv[1] + "/fsdp", 4, fsdp=True)
"""


def _free_port() -> int:
    """A port nobody listens on now: back-to-back launches on torchrun's fixed default port can
    collide with the previous run's socket, or with another test run on the same machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_ddp_and_fsdp_match_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT.format(tests=TESTS))
    launch = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"),
        *("--master_addr", "127.0.0.1", "--master_port", str(_free_port())),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [*launch, str(script), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        # The reference (one process, batch 8 = 2 x 4) trains here while torchrun starts up.
        train_tiny_classifier(str(tmp_path / "one"), 8)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]

    def adapter(name: str) -> dict[str, torch.Tensor]:
        return load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))

    one = adapter("one")
    assert (tmp_path / "one" / "rank0-of-1.done").is_file()
    for name in ("ddp", "fsdp"):  # both ranks ran to the end and agree on the held-out loss
        losses = [float((tmp_path / name / f"rank{r}-of-2.done").read_text()) for r in (0, 1)]
        assert losses[0] == pytest.approx(losses[1], abs=1e-6)
        other = adapter(name)
        assert other.keys() == one.keys()
        for k in one:
            assert one[k].shape == other[k].shape  # FSDP's saved adapter is gathered, not a shard
            torch.testing.assert_close(other[k], one[k], atol=1e-5, rtol=1e-4)
    assert any("lora_B" in k and torch.count_nonzero(v) > 0 for k, v in one.items())
    assert os.path.isdir(tmp_path / "fsdp" / "checkpoints" / "step-6")  # gathered checkpoint on rank 0
