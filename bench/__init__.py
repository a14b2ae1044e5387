"""Kiln's benchmarks: ``make bench`` (``python -m bench``) measures Kiln beside its peers.

Every comparison runs the peer in the same run, on the same PostgreSQL server; the figures
go to ``bench/results.json`` and the Markdown table ``bench/results.md`` (quoted in the
README). See ``python -m bench --help``.
"""
