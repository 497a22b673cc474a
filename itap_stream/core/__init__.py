"""The pure processing core: readings in, scored and explained results out.

Nothing in this package touches the network, a database, the clock, threads or the
environment; `tests/test_architecture.py` enforces it. The consumer, the batch
commands and the tests all drive the same functions.
"""
