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

How they run: one helper process per test process (``python docs_snippets.py --serve``) imports
torch, transformers and deltatune once, then forks a fresh child per page, so no page pays for
those imports. A page's child starts from that state only (its own working folder, environment,
``sys.argv``), never from another page's. A bash line that is a plain ``deltatune ...`` command
(no pipes, redirections or variables) runs as ``deltatune.cli.main(argv)`` in a fork of the page's
child, with a fresh random seed and the default dtype and thread count of a fresh process, its own stdout and
stderr, and its exit status taken from the return value or ``SystemExit``; any other line runs in
``bash``.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import tempfile
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
    """Run a page's steps in ``workdir`` in a fresh child process; return the failures (empty: all good)."""
    spec = workdir / ".snippet_steps.json"
    spec.write_text(json.dumps(steps))
    env = dict(os.environ)
    env.setdefault("MPLBACKEND", "Agg")
    env["TOKENIZERS_PARALLELISM"] = "false"
    code = _server().run(spec, workdir, env, timeout)
    if code != 0:
        log = workdir / ".snippet_driver.log"
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        return [f"driver exited with {code}: {tail}"]
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


def printed(workdir: Path) -> list[str]:
    """What each step of the last page run in ``workdir`` printed (stdout), in order."""
    return [str(r["stdout"]) for r in json.loads((workdir / ".snippet_results.json").read_text())]


# -- the client side: one server process per test process, started on first use ---------------------
class _Server:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
        self.pending = b""
        atexit.register(self.close)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.alive():
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the server exits at the end of its input
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def _reply(self, timeout: float) -> dict[str, int] | None:
        """The server's next line, or None if none comes within ``timeout`` seconds."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.pending:
            if not select.select([fd], [], [], timeout)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the docs snippet server exited (status {self.proc.wait()})")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return dict(json.loads(line))

    def run(self, spec: Path, workdir: Path, env: dict[str, str], timeout: float) -> int:
        assert self.proc.stdin is not None
        request = {"spec": str(spec), "cwd": str(workdir), "env": env}
        started: dict[str, int] | None = None
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
            started = self._reply(60)
            if started is None:
                raise RuntimeError("the docs snippet server did not start a page within 60 s")
            done = self._reply(timeout)
            if done is None:  # the page's child is stuck: stop it; the server then reports its exit
                os.kill(started["pid"], signal.SIGKILL)
                if self._reply(60) is None:
                    raise RuntimeError("the docs snippet server did not reap a stopped page")
        except BaseException:  # out of step with the server (e.g. Ctrl-C): the next page starts a new one
            if started is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(started["pid"], signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()
            raise
        if done is None:
            raise subprocess.TimeoutExpired(f"docs page run in {workdir}", timeout)
        return done["exit"]


_SERVER: _Server | None = None


def close_server() -> None:
    """Stop this process's server (at the end of a test session, so its exit is measured too)."""
    if _SERVER is not None:
        _SERVER.close()


def _server() -> _Server:
    global _SERVER
    if _SERVER is None or not _SERVER.alive():
        _SERVER = _Server()
    return _SERVER


# -- the server side ---------------------------------------------------------------------------------
# Imported once by the server, so a page's child starts with them loaded: import, not state.
PRELOAD = (
    "torch",
    "transformers",
    "transformers.models.bert.modeling_bert",
    "transformers.models.llama.modeling_llama",
    "deltatune",
    "deltatune.cli",
)
_FRESH: dict[str, object] = {}  # the torch settings of a fresh process, recorded before any page runs


def _serve() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    import torch

    _FRESH.update(dtype=torch.get_default_dtype(), threads=torch.get_num_threads())
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _exit(_page_child(request))
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), flush=True)


def _exit(code: int) -> None:
    """End a forked child as a process ends (exit handlers run: coverage saves its data), without
    returning into the loop that forked it."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        atexit._run_exitfuncs()
    finally:
        os._exit(code)


def _page_child(request: dict[str, object]) -> int:
    workdir, spec = str(request["cwd"]), Path(str(request["spec"]))
    log = os.open(os.path.join(workdir, ".snippet_driver.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 - the child's stdin until it exits
    os.dup2(sys.stdin.fileno(), 0)
    os.chdir(workdir)
    os.environ.clear()
    os.environ.update(dict(request["env"]))  # type: ignore[call-overload]
    sys.argv = [__file__, str(spec)]
    import torch

    torch.seed()  # a random seed, as a fresh process has (not the one every child would inherit)
    try:
        _drive(spec)
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def cli_argv(command: str) -> list[str] | None:
    """The arguments of a plain ``deltatune ...`` line, or None if it needs a shell."""
    if re.search(r"[|&;<>()$`*?~{}\[\]\\!]", command):
        return None
    words = shlex.split(command)
    return words[1:] if words and words[0] == "deltatune" else None


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``deltatune <argv>`` in a fork of this process: (exit status, stdout, stderr)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            _exit(_cli_child(argv))
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return os.waitstatus_to_exitcode(status), out.read(), err.read()


def _cli_child(argv: list[str]) -> int:
    import torch

    from deltatune.cli import main

    torch.seed()
    if _FRESH:
        torch.set_default_dtype(_FRESH["dtype"])  # type: ignore[arg-type]
        torch.set_num_threads(int(_FRESH["threads"]))  # type: ignore[call-overload]
    sys.argv = ["deltatune", *argv]
    try:
        return int(main(argv) or 0)
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1


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
            argv = cli_argv(step["code"])
            if argv is not None:
                code, stdout, stderr = _run_cli(argv)
            else:
                done = subprocess.run(
                    step["code"], shell=True, capture_output=True, text=True, executable="/bin/bash"
                )
                code, stdout, stderr = done.returncode, done.stdout, done.stderr
            results.append({"ok": code == 0, "stdout": stdout, "error": f"exit {code}\n{stderr}"})
            if code != 0:
                break
    (spec.parent / ".snippet_results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        _serve()
    else:
        _drive(Path(sys.argv[1]))
