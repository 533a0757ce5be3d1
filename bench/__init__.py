"""The benchmark harness of upstream-ops: ``make bench`` (``python -m bench``).

What it measures and how is in ``bench/README.md``; the latest figures are in ``docs/performance.md``.
"""
