"""gapcast.deploy: fleet rollout, the station replayer's broker helpers, and the files that put gapcast on machines."""

__all__: list[str] = []
