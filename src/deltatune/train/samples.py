"""A few sampled replies of a chat model: what a causal-LM run prints before and after training."""

from __future__ import annotations

from typing import Any

import torch


def sample_replies(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, str]],
    n: int = 3,
    max_new_tokens: int = 48,
    temperature: float = 0.8,
    seed: int = 0,
) -> list[str]:
    """``n`` replies sampled (seeded) to the chat ``messages``, rendered with the tokenizer's
    chat template; the model is put in eval mode for the call and restored after."""
    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    was_training = model.training
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            out = model.generate(
                **batch,
                do_sample=True,
                temperature=temperature,
                top_p=0.95,
                max_new_tokens=max_new_tokens,
                num_return_sequences=n,
                pad_token_id=tokenizer.pad_token_id,
            )
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    start = batch["input_ids"].shape[1]
    return [" ".join(tokenizer.decode(row[start:], skip_special_tokens=True).split()) for row in out]


def style_sampler(opts: Any, tokenizer: Any, say: Any) -> Any:
    """For the built-in causal-LM job (``--task causal_lm``, no --train-file): a function
    ``show(model, when)`` that prints a few sampled replies to the style's request; else None."""
    if opts.task != "causal_lm" or opts.train_file is not None:
        return None
    from deltatune.train.default_data import style_chat

    def show(model: Any, when: str) -> None:
        replies = sample_replies(model, tokenizer, style_chat(opts.style), n=3, seed=opts.seed)
        say(f"samples {when} ({style_chat(opts.style)[0]['content']!r}):")
        for reply in replies:
            say(f"  - {reply}")

    return show
