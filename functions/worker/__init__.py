"""Worker entry point: ``python -m functions.worker [--max-jobs N] [--idle-exit SECONDS]``."""
