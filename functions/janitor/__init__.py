"""Janitor entry point: ``python -m functions.janitor [--once]``."""
