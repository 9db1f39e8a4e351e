"""Serving: an OpenAI-compatible HTTP API with a playground page (app.py), fed by a batching scheduler."""

from lmforge.serve.app import ServeSettings, create_app, serve

__all__ = ["ServeSettings", "create_app", "serve"]
