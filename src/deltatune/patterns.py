"""Regular expressions from configs, matched in linear time.

``target_modules``, ``exclude_modules``, ``rank_pattern`` / ``alpha_pattern`` keys and the like
may come from an ``adapter_config.json`` someone else wrote. Python's ``re`` backtracks, so a
pattern such as ``(a+)+$`` can take longer than the age of the universe on a short module name.
Such patterns run here on RE2 (``google-re2``), whose matching time is linear in the text and
does not depend on the pattern's shape. RE2 has no look-around and no back-references; a
pattern that uses them is refused with an error that says what to write instead.
"""

from __future__ import annotations

import functools
from typing import Any

import re2

MAX_PATTERN_CHARS = 10_000  # module-name patterns are short; a long one only costs compile time
_MAX_PROGRAM_BYTES = 8 << 20  # RE2's memory budget for one compiled pattern


def _options() -> Any:
    options = re2.Options()
    options.log_errors = False  # the error is raised (and explained) here, not printed by RE2
    options.max_mem = _MAX_PROGRAM_BYTES
    return options


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> Any:
    """The compiled RE2 program for ``pattern``, or a ValueError saying why it cannot be run."""
    if not isinstance(pattern, str):
        raise ValueError(f"A module-name pattern must be a string, not {type(pattern).__name__}.")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(
            f"A module-name pattern of {len(pattern):,d} characters is longer than the {MAX_PATTERN_CHARS:,d} "
            "deltatune accepts; list the module names instead."
        )
    try:
        return re2.compile(pattern, options=_options())
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        shown = pattern if len(pattern) <= 120 else pattern[:100] + "..."
        raise ValueError(
            f"The module-name pattern {shown!r} (from target_modules, exclude_modules, modules_to_save, "
            f"rank_pattern or alpha_pattern) cannot be used: {reason}. deltatune matches patterns with a "
            "linear-time engine (RE2), which has no look-ahead/look-behind ((?=...), (?!...), (?<=...), "
            "(?<!...)), no back-references (\\1) and no \\Z (write $ or \\z). Rewrite the pattern without "
            "them, e.g. list the module names, or use exclude_modules to leave some out."
        ) from None


def fullmatch(pattern: str, text: str) -> bool:
    """True when ``pattern`` matches the whole of ``text`` (as ``re.fullmatch``), in linear time."""
    return compile_pattern(pattern).fullmatch(text) is not None
