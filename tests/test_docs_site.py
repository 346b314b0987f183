"""The documentation site builds with `mkdocs build --strict`, and it cannot rot quietly: a broken
link, a page left out of the nav and a snippet that no longer runs each fail (shown by breaking
one on purpose in a temporary copy of docs/ and mkdocs.yml)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from docs_snippets import blocks_of, plan, run_page

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings")


def build(root: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(root / "mkdocs.yml"),
            "-d",
            str(site),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def copy_site(tmp: Path) -> Path:
    """mkdocs.yml and docs/ copied; src/ linked (the API reference reads the docstrings there)."""
    root = tmp / "repo"
    root.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", root / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", root / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "src").symlink_to(ROOT / "src")
    return root


def test_the_site_builds_with_strict(tmp_path: Path) -> None:
    done = build(ROOT, tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    for page in ("index.html", "checklist/index.html", "api/deltatune/index.html", "api/quant/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    api = (tmp_path / "site" / "api" / "deltatune" / "index.html").read_text()
    assert "get_peft_model" in api and "LoraConfig" in api  # generated from the docstrings


def test_every_method_page_shows_its_diagram() -> None:
    for name, image in [
        ("lora.md", "diagram-lora.png"),
        ("dora.md", "diagram-dora.png"),
        ("qlora.md", "diagram-qlora.png"),
        ("ia3.md", "diagram-ia3.png"),
        ("bottleneck.md", "diagram-bottleneck.png"),
        ("prompt-tuning.md", "diagram-prompt-tuning.png"),
        ("prefix-tuning.md", "diagram-prefix-tuning.png"),
        ("full-fine-tuning.md", "diagram-full.png"),
    ]:
        assert f"(img/{image})" in (ROOT / "docs" / name).read_text(), name
        assert (ROOT / "docs" / "img" / image).is_file(), image


def test_every_method_page_says_when_to_choose_it() -> None:
    for name in ("lora.md", "dora.md", "qlora.md", "ia3.md", "bottleneck.md", "prompt-tuning.md",
                 "prefix-tuning.md", "full-fine-tuning.md"):  # fmt: skip
        assert "## When to choose" in (ROOT / "docs" / name).read_text(), name


# (what the edit is, page appended to, text appended or a new page's name, what the error names)
SITE_ERRORS = [
    ("broken link", "lora.md", "\nSee [the missing page](no-such-page.md).\n", "no-such-page.md"),
    ("broken anchor", "index.md", "\nSee [a section](lora.md#no-such-section).\n", "no-such-section"),
    ("page missing from the nav", "orphan.md", "# A page nobody can reach\n", "orphan.md"),
]


@pytest.mark.parametrize(
    "page_name, added, named", [e[1:] for e in SITE_ERRORS], ids=[e[0] for e in SITE_ERRORS]
)
def test_a_site_error_fails_the_build(tmp_path: Path, page_name: str, added: str, named: str) -> None:
    root = copy_site(tmp_path)
    page = root / "docs" / page_name
    page.write_text((page.read_text() if page.exists() else "") + added)
    done = build(root, tmp_path / "site")
    assert done.returncode != 0
    assert named in done.stdout + done.stderr


def test_a_snippet_that_no_longer_runs_fails(tmp_path: Path) -> None:
    root = copy_site(tmp_path)
    page = root / "docs" / "index.md"
    text = page.read_text()
    assert "get_peft_model(base" in text
    page.write_text(text.replace("get_peft_model(base", "get_peft_model(base_model", 1))
    workdir = tmp_path / "run"
    workdir.mkdir()
    failures = run_page(plan(blocks_of(page, root / "docs")).steps, workdir)
    assert failures and "NameError" in failures[0] and "base_model" in failures[0]


def test_a_wrong_output_fails(tmp_path: Path) -> None:
    root = copy_site(tmp_path)
    page = root / "docs" / "index.md"
    text = page.read_text()
    assert "trainable params: 3,584" in text
    page.write_text(text.replace("trainable params: 3,584", "trainable params: 3,585", 1))
    workdir = tmp_path / "run"
    workdir.mkdir()
    failures = run_page(plan(blocks_of(page, root / "docs")).steps, workdir)
    assert failures and "the output shown is not what runs" in failures[0]


def test_a_failing_cli_line_fails(tmp_path: Path) -> None:
    root = copy_site(tmp_path)
    page = root / "docs" / "index.md"
    page.write_text(page.read_text() + "\n```bash\ndeltatune no-such-command\n```\n")
    workdir = tmp_path / "run"
    workdir.mkdir()
    steps = plan(blocks_of(page, root / "docs")).steps
    assert steps[-1]["code"] == "deltatune no-such-command"
    failures = run_page(steps, workdir)
    assert failures and "no-such-command" in failures[0]


def test_the_diagrams_come_from_the_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(ROOT / "docs" / "scripts"))
    import method_diagrams

    monkeypatch.setattr(method_diagrams, "IMG", tmp_path)
    drawn = {draw().name for draw in method_diagrams.ALL}
    on_disk = {p.name for p in (ROOT / "docs" / "img").glob("diagram-*.png")}
    assert drawn == on_disk
    assert all((tmp_path / name).stat().st_size > 10_000 for name in drawn)


def test_the_api_reference_lists_every_public_name() -> None:
    import deltatune

    listed = set(
        re.findall(r"^\s+- (\w+)$", (ROOT / "docs" / "api" / "deltatune.md").read_text(), flags=re.M)
    )
    missing = sorted(set(deltatune.__all__) - listed - {"__version__"})
    assert not missing, f"add these to docs/api/deltatune.md: {missing}"
