"""Serving many adapters over one base: the adapter bank (batched mixed-adapter products)."""

from deltatune.serve.bank import AdapterBank

__all__ = ["AdapterBank"]
