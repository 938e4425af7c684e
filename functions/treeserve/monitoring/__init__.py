"""Monitoring: captured traffic against the training reference."""
