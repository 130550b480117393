"""gapcast.bench: benchmarks that print tables and save JSON (never timed tests)."""

__all__: list[str] = []
