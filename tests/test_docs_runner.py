"""The runner behind the docs snippet tests (tests/docs_snippets.py), on tiny pages: plain
``deltatune ...`` lines run in-process with their own status and output, other lines in bash, pages
never see each other's state, and a page that crashes or hangs is reported and stopped."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from docs_snippets import blocks_of, cli_argv, plan, run_page


def run(tmp_path: Path, page: str, name: str = "page", timeout: float = 120) -> list[str]:
    docs = tmp_path / f"{name}-docs"
    docs.mkdir()
    (docs / "page.md").write_text(page)
    workdir = tmp_path / f"{name}-run"
    workdir.mkdir()
    return run_page(plan(blocks_of(docs / "page.md", docs)).steps, workdir, timeout=timeout)


def fence(lang: str, body: str, title: str = "") -> str:
    info = f'{lang} title="{title}"' if title else lang
    return f"```{info}\n{body}\n```\n"


def test_only_plain_deltatune_lines_run_in_process() -> None:
    assert cli_argv("deltatune inspect 'my adapter' --json") == ["inspect", "my adapter", "--json"]
    assert cli_argv("deltatune train --model ./bert --max-steps 4") == [
        "train",
        "--model",
        "./bert",
        "--max-steps",
        "4",
    ]
    for shell_line in [
        "deltatune inspect a | head -1",
        "deltatune inspect a > out.txt",
        "deltatune inspect $HOME/a",
        "deltatune inspect a && ls",
        "deltatune inspect runs/*/adapter",
        "torchrun -m deltatune.cli train",
        "ls my-adapter",
    ]:
        assert cli_argv(shell_line) is None, shell_line


def test_a_cli_line_is_checked_like_a_shell_command(tmp_path: Path) -> None:
    usage = "usage: deltatune [-h]\n...\n"
    assert run(tmp_path, fence("bash", "deltatune --help") + fence("text", usage, "Output"), "help") == []
    wrong = run(
        tmp_path, fence("bash", "deltatune --help") + fence("text", "usage: dt [-h]", "Output"), "wrong"
    )
    assert (
        len(wrong) == 1
        and "the output shown is not what runs" in wrong[0]
        and "usage: deltatune [-h]" in wrong[0]
    )
    failed = run(tmp_path, fence("bash", "deltatune inspect missing-folder\necho never"), "failed")
    assert len(failed) == 2
    assert "exit 2" in failed[0] and "No adapter_config.json in 'missing-folder'" in failed[0]
    assert "not reached" in failed[1]


def test_other_lines_run_in_bash(tmp_path: Path) -> None:
    page = fence("bash", "echo deltatune | tr a-z A-Z") + fence("text", "DELTATUNE", "Output")
    assert run(tmp_path, page) == []
    assert "exit 3" in run(tmp_path, fence("bash", "exit 3"), "exit")[0]


def test_pages_do_not_share_state(tmp_path: Path) -> None:
    leaky = """
import os, torch, deltatune
torch.set_default_dtype(torch.float64)
torch.manual_seed(1)
os.environ["DOCS_RUNNER_LEAK"] = "1"
deltatune.docs_runner_leak = True
os.mkdir("elsewhere")
os.chdir("elsewhere")
"""
    assert run(tmp_path, fence("python", leaky), "first") == []
    check = f"""
import os, torch, deltatune
assert torch.get_default_dtype() == torch.float32
assert torch.initial_seed() != 1
assert "DOCS_RUNNER_LEAK" not in os.environ
assert not hasattr(deltatune, "docs_runner_leak")
assert os.getcwd() == {str(tmp_path / "second-run")!r}
"""
    assert run(tmp_path, fence("python", check), "second") == []


def test_a_crash_is_reported_with_what_the_page_printed(tmp_path: Path) -> None:
    page = fence(
        "python", 'import os, sys\nprint("about to crash", file=sys.stderr, flush=True)\nos._exit(3)'
    )
    failures = run(tmp_path, page)
    assert len(failures) == 1 and "driver exited with 3" in failures[0] and "about to crash" in failures[0]


def test_a_page_that_hangs_is_stopped_and_the_next_one_runs(tmp_path: Path) -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        run(tmp_path, fence("python", "import time\ntime.sleep(120)"), "hang", timeout=1)
    assert run(tmp_path, fence("python", "print(6 * 7)") + fence("text", "42", "Output"), "after") == []
