"""Batch scoring: jobs, streaming objects, the worker (see DESIGN.md "Scale beyond one function")."""
