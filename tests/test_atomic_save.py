"""Crash-safe and concurrent saves, with real processes.

A save killed with ``kill -9`` at any moment leaves the complete old adapter folder or the
complete new one (with the user's other files kept); the next save cleans what the kill left.
Readers that load while other processes save always get one whole adapter, and concurrent
writers never fail. The same holds for a folder replaced whole (``deltatune merge --overwrite``).

The kills hit grandchildren forked by one helper process (one Python start-up for all of them),
at seeded random moments.
"""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.io import CONFIG_NAME, WEIGHTS_NAME, atomic_write_text
from deltatune.train.checkpoint import LoopState, save_checkpoint

# Builds two generations of an adapter (lora_alpha 4 / weights 1.0, lora_alpha 64 / weights 2.0;
# "default" in the folder and "other" in a sub-folder) and serves commands on stdin:
#   "save <folder> <seconds> <k>"  fork a child that saves the two generations in turn, kill -9 it
#                               <seconds> after its k-th whole save, print "killed" (counting
#                               whole saves keeps the kills mid-save however loaded the machine)
#   "swap <folder> <seconds> <k>"  the same with replace_folder(keep_others=False) of a 3-file folder
#   "loop <folder> <n> <gen>"   save generation <gen> n times (no kill), print "done"
#   "writers <folder> <n>"      two children save generation 0 / 1 up to n times each, until the
#                               file <folder>.stop exists, print "started", then their exit codes
_HELPER = textwrap.dedent(
    """
    import os, signal, sys, time
    import torch
    from torch import nn
    from deltatune import LoraConfig, get_peft_model

    torch.set_num_threads(1)

    def generation(alpha, value):
        base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        cfg = lambda: LoraConfig(r=4, lora_alpha=alpha, target_modules=["0", "2"], init_lora_weights=False)
        model = get_peft_model(base, cfg())
        model.add_adapter("other", cfg())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.fill_(value)
        return model

    gens = [generation(4.0, 1.0), generation(64.0, 2.0)]

    def swap(folder, i):
        from deltatune.io import replace_folder

        with replace_folder(folder, keep_others=False) as tmp:
            for name in ("a.bin", "b.bin", "config.json"):
                with open(os.path.join(tmp, name), "w") as fh:
                    fh.write(str(i % 2) * 100_000)

    print("ready", flush=True)
    for line in sys.stdin:
        cmd, folder, arg = line.split()[:3]
        if cmd == "loop":
            for _ in range(int(arg)):
                gens[int(line.split()[3])].save_pretrained(folder)
            print("done", flush=True)
            continue
        if cmd == "writers":  # two children save generation 0 / 1, at the same time
            pids = []
            for g in (0, 1):
                pid = os.fork()
                if pid == 0:
                    code = 0
                    try:
                        for _ in range(int(arg)):
                            if os.path.exists(folder + ".stop"):
                                break
                            gens[g].save_pretrained(folder)
                    except BaseException as exc:
                        print(f"writer {g}: {exc!r}", file=sys.stderr, flush=True)
                        code = 1
                    open(os.path.join(os.path.dirname(folder), f"writer-{g}-done"), "w").close()
                    os._exit(code)
                pids.append(pid)
            print("started", flush=True)
            codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
            print("exit", *codes, flush=True)
            continue
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            i = 0
            while True:
                if cmd == "save":
                    gens[i % 2].save_pretrained(folder)
                else:
                    swap(folder, i)
                i += 1
                os.write(w, b".")  # one whole save done
        os.close(w)
        for _ in range(int(line.split()[3])):
            os.read(r, 1)
        time.sleep(float(arg))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        print("killed", flush=True)
    """
)


@pytest.fixture(scope="module")
def helper():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HELPER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "ready"

    def ask(line: str) -> str:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()

    ask.stdout = proc.stdout  # type: ignore[attr-defined]
    yield ask
    proc.stdin.close()
    proc.wait(timeout=60)


def _base() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _loaded_generation(model: PeftModel, name: str) -> int:
    alpha = {4.0: 0, 64.0: 1}[model.peft_config[name].lora_alpha]  # type: ignore[attr-defined]
    values = {float(p.flatten()[0]) for n, p in model.named_parameters() if f"lora_A.{name}." in n}
    assert values in ({1.0}, {2.0}), values
    assert {1.0: 0, 2.0: 1}[values.pop()] == alpha, "config and weights from two different saves"
    return alpha


def _generation(folder: Path, files: bool = True) -> int:
    """0 or 1: which generation the folder holds, as a user loads it (config and weights must come
    from one save). ``files``: also read the files directly (only while nobody writes) and check
    that the default adapter and the sub-folder one come from one save too."""
    model = PeftModel.from_pretrained(_base(), str(folder))
    gen = _loaded_generation(model, "default")
    if files:
        model.load_adapter(str(folder), "other", subfolder="other")
        assert _loaded_generation(model, "other") == gen, "the sub-folder adapter is from another save"
        for sub in (folder, folder / "other"):
            config = json.loads((sub / CONFIG_NAME).read_text())
            weights = load_file(str(sub / WEIGHTS_NAME))
            assert {4.0: 0, 64.0: 1}[config["lora_alpha"]] == gen
            assert {float(v.flatten()[0]) for v in weights.values()} == {[1.0, 2.0][gen]}
    return gen


def _leftovers(folder: Path) -> list[str]:
    return [p for p in os.listdir(folder.parent) if p.startswith(f".{folder.name}.")]


@pytest.mark.slow
def test_kill_9_during_saves_leaves_old_or_new(helper, tmp_path):
    folder = tmp_path / "adapter"
    assert helper(f"loop {folder} 1 0") == "done"
    (folder / "notes.txt").write_text("the user's own file")
    rng = random.Random(17)
    outcomes, interrupted = [], 0
    for _ in range(25):
        assert helper(f"save {folder} {rng.uniform(0.0, 0.4):.3f} {rng.choice([1, 2])}") == "killed"
        interrupted += bool(_leftovers(folder))
        outcomes.append(_generation(folder))  # whole, and loadable
        assert (folder / "notes.txt").read_text() == "the user's own file"
    assert set(outcomes) == {0, 1}, outcomes  # the kills landed in saves of both generations
    assert interrupted >= 5, interrupted  # and many of them mid-save (a half-built folder was left)
    assert helper(f"loop {folder} 1 1") == "done"  # the next save cleans up what the kills left
    assert _leftovers(folder) == [] and _generation(folder) == 1


@pytest.mark.slow
def test_kill_9_during_whole_folder_replace(helper, tmp_path):
    """``replace_folder(keep_others=False)``, which ``deltatune merge --overwrite`` uses."""
    from deltatune.io import replace_folder

    folder = tmp_path / "merged"
    rng = random.Random(18)
    seen = set()
    for _ in range(15):
        assert helper(f"swap {folder} {rng.uniform(0.0, 0.3):.3f} {rng.choice([1, 2])}") == "killed"
        contents = {p.name: p.read_text() for p in folder.iterdir()}
        assert sorted(contents) == ["a.bin", "b.bin", "config.json"]
        assert len(set(contents.values())) == 1 and len(next(iter(contents.values()))) == 100_000
        seen.add(next(iter(contents.values()))[0])
    assert seen == {"0", "1"}
    with replace_folder(str(folder), keep_others=False) as tmp:
        Path(tmp, "x").write_text("new")
    assert [p.name for p in folder.iterdir()] == ["x"] and _leftovers(folder) == []


@pytest.mark.slow
def test_readers_see_whole_adapters_while_two_processes_save(helper, tmp_path):
    """Two processes save different adapters to one folder while this one loads it in a loop."""
    folder = tmp_path / "adapter"
    assert helper(f"loop {folder} 1 0") == "done"
    assert helper(f"writers {folder} 1000") == "started"
    seen: list[int] = []
    done = [tmp_path / f"writer-{g}-done" for g in (0, 1)]
    while not all(d.exists() for d in done):
        seen.append(_generation(folder, files=False))  # never a mix, never FileNotFoundError
        if len(seen) >= 5 and set(seen) == {0, 1}:
            (tmp_path / "adapter.stop").touch()  # enough seen: the writers stop
    assert helper.stdout.readline().split() == ["exit", "0", "0"]  # no writer failed
    assert len(seen) >= 5 and set(seen) == {0, 1} and _leftovers(folder) == []


def test_swap_keeps_other_files_and_subfolders(tmp_path):
    from deltatune.io import replace_folder

    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    (folder / "sub").mkdir()
    (folder / "sub" / "deep.txt").write_text("deep")
    (folder / "old.txt").write_text("old")
    with replace_folder(str(folder)) as tmp:
        Path(tmp, "old.txt").write_text("new")
    assert (folder / "keep.txt").read_text() == "mine" and (folder / "sub" / "deep.txt").read_text() == "deep"
    with replace_folder(str(folder)) as tmp:  # a sub-folder the new version writes keeps its other files
        Path(tmp, "sub").mkdir()
        Path(tmp, "sub", "new.txt").write_text("new")
    assert (folder / "sub" / "deep.txt").read_text() == "deep" and (
        folder / "sub" / "new.txt"
    ).read_text() == "new"
    assert (folder / "old.txt").read_text() == "new" and _leftovers(folder) == []


def test_an_exception_while_building_leaves_the_folder_untouched(tmp_path):
    from deltatune.io import replace_folder

    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "f").write_text("old")
    with pytest.raises(KeyError), replace_folder(str(folder)) as tmp:
        Path(tmp, "f").write_text("new")
        raise KeyError("boom")
    assert (folder / "f").read_text() == "old" and _leftovers(folder) == []


def test_without_an_atomic_exchange_a_crash_between_renames_is_recovered(tmp_path, monkeypatch):
    """Filesystems without renameat2(RENAME_EXCHANGE) swap with two renames; a crash between them
    leaves the old folder under a hidden name, which the next save or load puts back."""
    import deltatune.folders as folders

    folder = tmp_path / "adapter"
    model = get_peft_model(_base(), LoraConfig(r=2, target_modules=["0"]))
    model.save_pretrained(str(folder))
    monkeypatch.setattr(folders, "exchange_paths", lambda a, b: False)
    real_rename = os.rename

    class Crash(BaseException):
        pass

    def rename(src, dst):
        if str(dst) == str(folder):
            raise Crash  # the old folder has just been moved aside
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Crash):
        model.save_pretrained(str(folder))
    monkeypatch.setattr(os, "rename", real_rename)
    assert not folder.exists() and (tmp_path / ".adapter.deltatune-old").is_dir()
    PeftModel.from_pretrained(
        _base(), str(folder)
    )  # the next load puts the old folder back (no writer lives)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Crash):
        model.save_pretrained(str(folder))
    monkeypatch.setattr(os, "rename", real_rename)
    model.save_pretrained(str(folder))  # the next save puts the old folder back, then swaps
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    PeftModel.from_pretrained(_base(), str(folder))


def test_exchange_paths_swaps_two_folders(tmp_path):
    from deltatune.io import exchange_paths

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    if not exchange_paths(str(a), str(b)):
        pytest.skip("this filesystem has no atomic exchange")
    assert (b / "x").read_text() == "a" and not (a / "x").exists()


def test_modes_follow_the_umask(tmp_path):
    """0644 files / 0755 folders under umask 022, as PEFT (plain open / mkdir) writes them; a
    serving account in the group must be able to read a saved adapter."""
    from deltatune.io import replace_folder

    old = os.umask(0o022)
    try:
        model = get_peft_model(_base(), LoraConfig(r=2, target_modules=["0"]))
        model.save_pretrained(str(tmp_path / "adapter"))
        atomic_write_text(str(tmp_path / "config.yaml"), "a: 1\n")
        lin = nn.Linear(2, 2)
        opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        with replace_folder(str(tmp_path / "merged"), keep_others=False) as tmp:
            Path(tmp, "model.safetensors").write_text("x")
        step = Path(save_checkpoint(str(tmp_path / "run"), {"w": lin.weight}, opt, sched, LoopState(step=3)))
        os.umask(0o027)
        model.save_pretrained(str(tmp_path / "group"))
    finally:
        os.umask(old)

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(tmp_path / "adapter") == 0o755
    for name in (CONFIG_NAME, WEIGHTS_NAME, "README.md"):
        assert mode(tmp_path / "adapter" / name) == 0o644
    assert mode(tmp_path / "config.yaml") == 0o644
    assert mode(tmp_path / "merged") == 0o755  # deltatune merge's output folder
    assert mode(step) == 0o755 and all(mode(p) == 0o644 for p in step.iterdir()), [
        oct(mode(p)) for p in step.iterdir()
    ]
    assert mode(tmp_path / "group") == 0o750 and mode(tmp_path / "group" / CONFIG_NAME) == 0o640


def test_a_resave_keeps_the_folder_mode(tmp_path):
    model = get_peft_model(_base(), LoraConfig(r=2, target_modules=["0"]))
    model.save_pretrained(str(tmp_path / "a"))
    os.chmod(tmp_path / "a", 0o700)
    model.save_pretrained(str(tmp_path / "a"))
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700


def test_saving_into_the_current_folder_keeps_it_usable(tmp_path, monkeypatch):
    folder = tmp_path / "here"
    folder.mkdir()
    monkeypatch.chdir(folder)
    model = get_peft_model(_base(), LoraConfig(r=2, target_modules=["0"]))
    model.save_pretrained(".")
    model.save_pretrained(".")
    assert os.path.samefile(os.getcwd(), folder) and Path(CONFIG_NAME).is_file()


def test_merge_overwrite_replaces_whole_and_a_failure_keeps_the_old(tmp_path, monkeypatch):
    """``replace_folder(keep_others=False)``: the old folder's files go; if building fails, the
    old folder stays as it was (the CLI's merge --overwrite uses exactly this)."""
    from deltatune.io import replace_folder

    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.safetensors").write_text("old")
    with pytest.raises(OSError), replace_folder(str(out), keep_others=False) as tmp:
        Path(tmp, "model.safetensors").write_text("half")
        raise OSError("disk full")
    assert [p.name for p in out.iterdir()] == ["old.safetensors"]
    with replace_folder(str(out), keep_others=False) as tmp:
        Path(tmp, "model.safetensors").write_text("new")
    assert [p.name for p in out.iterdir()] == ["model.safetensors"] and _leftovers(out) == []


def test_sigkill_helper_really_kills(tmp_path):
    """The crash tests above rely on SIGKILL ending a process at once (no handler can run)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.01)"])
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert torch.tensor(1.0).item() == 1.0
