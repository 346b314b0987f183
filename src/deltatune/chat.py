"""An interactive chat with a causal LM (base or adapter): the conversation is rendered with the
tokenizer's chat template, and each reply is streamed to the terminal as it is generated.

Used by ``deltatune chat``; callable from Python with any model that has ``generate``::

    from deltatune.assets import load_default_lm
    from deltatune.chat import chat_loop
    model, tokenizer = load_default_lm()
    chat_loop(model, tokenizer)            # reads stdin until EOF or /exit

Lines typed (or piped) in are the user's turns. ``/reset`` forgets the conversation, ``/exit``
(or end of input) ends it.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import torch
from transformers import TextStreamer

HELP = "Type a message and press Enter; /reset starts over, /exit (or Ctrl-D) quits."


class _Streamer(TextStreamer):
    """transformers' ``TextStreamer``, writing to ``out`` (not necessarily stdout) and flushing per piece."""

    def __init__(self, tokenizer: Any, out: TextIO) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def reply(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, str]],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    out: TextIO | None = None,
) -> str:
    """Generate the assistant's next turn for ``messages`` (streamed to ``out`` if given) and
    return it as text."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "This model's tokenizer has no chat template, so a conversation cannot be rendered; use "
            "`deltatune generate --prompt ...` for plain text continuation."
        )
    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
    if temperature > 0:
        kw["temperature"] = temperature
    if tokenizer.pad_token_id is None:
        kw["pad_token_id"] = tokenizer.eos_token_id
    if out is not None:
        kw["streamer"] = _Streamer(tokenizer, out)
    with torch.no_grad():
        ids = model.generate(**batch, **kw)
    return str(tokenizer.decode(ids[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)).strip()


def chat_loop(
    model: Any,
    tokenizer: Any,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> list[dict[str, str]]:
    """Read user turns line by line from ``stdin`` and stream each reply to ``stdout`` until end
    of input or ``/exit``; returns the conversation. The ``you>`` prompt is shown only when
    ``stdin`` is a terminal, so piped input gives clean output (one reply per line)."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interactive = stdin.isatty()
    start: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    if interactive:
        stdout.write(HELP + "\n")
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            if interactive:
                stdout.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": text})
        if interactive:
            stdout.write("bot> ")
            stdout.flush()
        answer = reply(model, tokenizer, messages, max_new_tokens, temperature, out=stdout)
        messages.append({"role": "assistant", "content": answer})
    return messages
