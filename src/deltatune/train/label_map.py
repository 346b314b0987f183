"""The label names of a classification adapter, saved beside it (``labels.json``)."""

from __future__ import annotations

import json
import os

LABELS_FILE = "labels.json"


def save_label_map(folder: str, label_names: list[str]) -> None:
    """The label names of a classification adapter, transformers-style (``id2label`` /
    ``label2id``), in ``labels.json`` beside the adapter files: evaluation maps string labels
    with them instead of rebuilding the mapping from its own data."""
    from deltatune.io import atomic_write_text

    data = {
        "id2label": {str(i): n for i, n in enumerate(label_names)},
        "label2id": {n: i for i, n in enumerate(label_names)},
    }
    atomic_write_text(
        os.path.join(folder, LABELS_FILE), json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    )


def load_label_map(folder: str, num_labels: int | None = None) -> list[str] | None:
    """The label names saved with an adapter (or in a model's config.json), or None.

    The file is untrusted input: it must map 0..N-1 to distinct strings (N = the head's size
    when given), else it is refused, naming the file."""
    path = os.path.join(folder, LABELS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        id2label = data["id2label"]
        names = [id2label[str(i)] for i in range(len(id2label))]
        ok = all(isinstance(n, str) for n in names) and len(set(names)) == len(names)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ValueError(
            f"{path}: not a valid label map ({type(exc).__name__}); it should hold "
            '{"id2label": {"0": "name", ...}, "label2id": {...}}. Delete it to evaluate with integer labels.'
        ) from exc
    if not ok or (num_labels is not None and len(names) != num_labels):
        raise ValueError(
            f"{path}: the label map must name each of the head's {num_labels or len(names)} classes once "
            f"(found {len(names)} names). Delete it to evaluate with integer labels."
        )
    return names
