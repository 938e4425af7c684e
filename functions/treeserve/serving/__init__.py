"""Serving: the model service, inputs, codecs, the FastAPI app, capture."""
