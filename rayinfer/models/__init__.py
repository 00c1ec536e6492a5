"""Models: the catalog, finding models and adapters (``locate``), loading them in actors (``load``).

``load_model`` and ``load_tokenizer`` are part of the task author's toolkit (docs/plugins.md)."""

from rayinfer.models.load import LoadContext, load_model, load_tokenizer

__all__ = ["LoadContext", "load_model", "load_tokenizer"]
