"""Serving many adapters over one base: the adapter bank (batched mixed-adapter products) and
the adapter store (a directory of adapter folders, the hottest ones resident in the bank)."""

from deltatune.serve.bank import AdapterBank, Scales, ia3_scales, serving_model
from deltatune.serve.store import AdapterNotFound, AdapterRefused, AdapterStore, check_name

__all__ = [
    "AdapterBank",
    "AdapterNotFound",
    "AdapterRefused",
    "AdapterStore",
    "Scales",
    "check_name",
    "ia3_scales",
    "serving_model",
]
