"""Code blocks of the documentation, extracted and run (imported by tests/test_docs_*.py).

Rules a page follows (the tests enforce them):

- Every fenced block names its language. ``python`` blocks run, in page order, in one Python
  session per page; each line of a ``bash`` block runs as a shell command (``\\`` continues a
  line, ``#`` starts a comment). Both run in a fresh temporary folder shared by the page.
- A block that must not run says so where the reader sees it, in its title:
  ````python title="Not run: <why>"````. The reason is rendered above the block on the site.
- A ``text`` block titled ``Output`` right after a block that runs is that block's output: the
  printed lines must match, where a line ``...`` stands for any number of lines.
- Any other language (``text``, ``yaml``, ``json``) is shown, not run.

Run as a script, this module is the per-page driver: ``python docs_snippets.py steps.json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

RUNNABLE = ("python", "bash")
NOT_RUN = "Not run:"
FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<info>[^`\n]*)\n(?P<body>.*?)^(?P=indent)```[ ]*$", re.S | re.M)
TITLE = re.compile(r'title="(?P<title>[^"]*)"')


@dataclass
class Block:
    page: str
    line: int
    lang: str
    title: str
    body: str

    @property
    def not_run_reason(self) -> str | None:
        return self.title[len(NOT_RUN) :].strip() if self.title.startswith(NOT_RUN) else None

    @property
    def runs(self) -> bool:
        return self.lang in RUNNABLE and self.not_run_reason is None

    def where(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass
class PageRun:
    blocks: list[Block]
    steps: list[dict[str, object]] = field(default_factory=list)


def blocks_of(path: Path, root: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        info = match.group("info").strip()
        lang = info.split()[0] if info else ""
        title_match = TITLE.search(info)
        indent = len(match.group("indent"))
        body = "\n".join(line[indent:] for line in match.group("body").splitlines())
        line = text.count("\n", 0, match.start()) + 1
        found.append(
            Block(
                str(path.relative_to(root)),
                line,
                lang,
                title_match.group("title") if title_match else "",
                body,
            )
        )
    return found


def bash_commands(body: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    commands, current = [], ""
    for raw in body.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        stripped = strip_comment(current).strip()
        if stripped:
            commands.append(stripped)
        current = ""
    return commands


def strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` inside quotes or a word is kept)."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def output_matches(expected: str, actual: str) -> bool:
    """Line-by-line match after trailing spaces; a line ``...`` matches any number of lines."""
    want = [line.rstrip() for line in expected.strip("\n").splitlines()]
    got = [line.rstrip() for line in actual.strip("\n").splitlines()]

    def match(i: int, j: int) -> bool:
        if i == len(want):
            return j == len(got)
        if want[i] == "...":
            return any(match(i + 1, k) for k in range(j, len(got) + 1))
        return j < len(got) and want[i] == got[j] and match(i + 1, j + 1)

    return match(0, 0)


def plan(blocks: list[Block]) -> PageRun:
    """The steps that run for one page, each with the output it must print (if the page shows one)."""
    run = PageRun(blocks)
    for i, block in enumerate(blocks):
        if not block.runs:
            continue
        expected = None
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None
        if nxt is not None and nxt.lang == "text" and nxt.title == "Output":
            expected = nxt.body
        if block.lang == "python":
            run.steps.append(
                {"kind": "python", "code": block.body, "where": block.where(), "expected": expected}
            )
        else:
            for command in bash_commands(block.body):
                run.steps.append({"kind": "bash", "code": command, "where": block.where(), "expected": None})
            if expected is not None and run.steps:
                run.steps[-1]["expected"] = expected
    return run


def run_page(steps: list[dict[str, object]], workdir: Path, timeout: float = 600) -> list[str]:
    """Run a page's steps in ``workdir`` in a fresh interpreter; return the failures (empty: all good)."""
    spec = workdir / ".snippet_steps.json"
    spec.write_text(json.dumps(steps))
    env = dict(os.environ)
    env.setdefault("MPLBACKEND", "Agg")
    env["TOKENIZERS_PARALLELISM"] = "false"
    done = subprocess.run(
        [sys.executable, __file__, str(spec)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if done.returncode != 0:
        return [f"driver exited with {done.returncode}: {done.stderr[-3000:]}"]
    results = json.loads((workdir / ".snippet_results.json").read_text())
    failures = []
    for step, result in zip(steps, results, strict=False):
        if not result["ok"]:
            failures.append(
                f"{step['where']}: `{str(step['code'])[:200]}` failed:\n{result['error'][-3000:]}"
            )
        elif step["expected"] is not None and not output_matches(str(step["expected"]), result["stdout"]):
            failures.append(
                f"{step['where']}: the output shown is not what runs:\n--- shown\n{step['expected']}\n"
                f"--- printed\n{result['stdout']}"
            )
    if len(results) < len(steps):
        failures.append(f"{steps[len(results)]['where']}: not reached")
    return failures


def _drive(spec: Path) -> None:
    steps = json.loads(spec.read_text())
    namespace: dict[str, object] = {"__name__": "__main__"}
    results = []
    for step in steps:
        if step["kind"] == "python":
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    exec(compile(step["code"], step["where"], "exec"), namespace)
                results.append({"ok": True, "stdout": out.getvalue()})
            except BaseException:
                results.append({"ok": False, "stdout": out.getvalue(), "error": traceback.format_exc()})
                break
        else:
            done = subprocess.run(
                step["code"], shell=True, capture_output=True, text=True, executable="/bin/bash"
            )
            ok = done.returncode == 0
            results.append(
                {"ok": ok, "stdout": done.stdout, "error": f"exit {done.returncode}\n{done.stderr}"}
            )
            if not ok:
                break
    (spec.parent / ".snippet_results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    _drive(Path(sys.argv[1]))
