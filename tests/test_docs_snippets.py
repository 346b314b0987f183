"""Every code block in docs/ runs as shown: Python blocks in one session per page, every CLI
line of a bash block, and shown outputs compared with what runs (rules in tests/docs_snippets.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from docs_snippets import Block, blocks_of, plan, run_page

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md"))
# Pages whose blocks another test file runs already (so they are not run twice).
RUN_ELSEWHERE = {"integrations.md": "tests/test_integrations_docs.py"}
# Blocks titled "Not run: <why>" (a GPU cluster, a server left running, a checkpoint on disk, a
# pip install, a run of minutes). A new one has to be counted here, so none slips in unnoticed.
MAX_NOT_RUN = 25


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in blocks_of(page, DOCS)]


def test_every_block_names_its_language() -> None:
    bare = [b.where() for b in all_blocks() if not b.lang]
    assert not bare, f"fenced blocks without a language (python, bash, text, ...): {bare}"


def test_blocks_that_do_not_run_say_why_and_are_counted() -> None:
    blocks = all_blocks()
    not_run = [b for b in blocks if b.not_run_reason is not None]
    assert all(len(b.not_run_reason or "") >= 10 for b in not_run), [b.where() for b in not_run]
    runnable = [b for b in blocks if b.runs and b.page not in RUN_ELSEWHERE]
    print(f"\n{len(runnable)} blocks run, {len(not_run)} marked not run:")
    for b in not_run:
        print(f"  {b.where()}: {b.not_run_reason}")
    assert len(runnable) >= 20
    assert len(not_run) <= MAX_NOT_RUN, "more blocks marked 'Not run' than counted; make them run"


def test_outputs_follow_a_block() -> None:
    for page in PAGES:
        blocks = blocks_of(page, DOCS)
        for before, block in zip(blocks, blocks[1:], strict=False):
            if block.title == "Output":
                assert before.lang in ("python", "bash"), f"{block.where()}: an Output block follows no code"


# Pages whose snippets start several processes (the CLI, torchrun, the advisor): slow, still run.
SLOW_PAGES = {"advise.md", "cli.md", "distributed.md", "training-python.md"}


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(p, marks=[pytest.mark.slow] if p.name in SLOW_PAGES else [], id=str(p.relative_to(DOCS)))
        for p in PAGES
        if p.name not in RUN_ELSEWHERE and plan(blocks_of(p, DOCS)).steps
    ],
)
def test_page_snippets_run(page: Path, tmp_path: Path) -> None:
    failures = run_page(plan(blocks_of(page, DOCS)).steps, tmp_path)
    assert not failures, "\n\n".join(failures)
