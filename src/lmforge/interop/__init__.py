"""Bridges to other ecosystems' file layouts; `hf` is Hugging Face `transformers`."""

from lmforge.interop.hf import export_hf, import_hf

__all__ = ["export_hf", "import_hf"]
