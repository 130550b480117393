"""gapcast.tools: the leaf package (replay, collector, local broker, demo, tiny bundle builder).

It may import every other part (train, export, edge, deploy); nothing imports it but ``gapcast.cli`` and
``gapcast.bench`` (``tests/test_layers.py`` enforces it).
"""
