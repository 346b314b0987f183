"""llama.cpp's PEFT-adapter converter (``convert_lora_to_gguf.py``) for the tests.

No PyPI package installs the script, but llama-cpp-python's source distribution carries llama.cpp
(``vendor/llama.cpp``). The first call downloads that sdist with pip (``pip download``, no build)
and extracts only the converter and what it imports (``convert_hf_to_gguf.py``, ``conversion/``,
``gguf-py/``) into ``.llama-cpp/<version>/`` at the repository root; later calls reuse it.
``DELTATUNE_LLAMA_CPP=/path/to/llama.cpp`` uses a checkout instead. Where pip cannot reach a
package index, the calling test is skipped with the reason.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

VERSION = "0.3.36"  # llama-cpp-python, whose sdist vendors llama.cpp
ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".llama-cpp" / VERSION
MEMBERS = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def converter_dir() -> Path:
    """A folder holding ``convert_lora_to_gguf.py`` and the modules it imports."""
    given = os.environ.get("DELTATUNE_LLAMA_CPP")
    if given:
        return Path(given)
    if (CACHE / "done").exists():
        return CACHE
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with open(CACHE.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one downloader at a time (pytest-xdist workers)
        if not (CACHE / "done").exists():
            _fetch()
    return CACHE


def _fetch() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-deps",
               "--no-binary", "llama-cpp-python", "--quiet", "-d", tmp]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not sdists:
            reason = (done.stderr or done.stdout).strip().splitlines()[-2:]
            pytest.skip(
                f"cannot download llama-cpp-python's sdist for llama.cpp's converter: {' | '.join(reason)}"
            )
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
        staging = CACHE.with_name(CACHE.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(sdists[0]) as archive:
            wanted = [
                m
                for m in archive.getmembers()
                if (m.isfile() or m.isdir()) and m.name.startswith(prefix)
                and m.name[len(prefix) :].startswith(MEMBERS)
            ]  # fmt: skip
            for member in wanted:
                member.name = member.name[len(prefix) :]
            archive.extractall(staging, members=wanted, filter="data")
        shutil.rmtree(CACHE, ignore_errors=True)
        staging.rename(CACHE)
        (CACHE / "done").touch()
