"""Refresh: a model upload checked, gated, registered and promoted."""
