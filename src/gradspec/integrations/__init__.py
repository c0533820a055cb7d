"""Integrations of gradspec with training frameworks (``gradspec.integrations.transformers``)."""
