"""Runnable studies: each script writes a Markdown table and a PNG (``--quick`` for tests)."""
