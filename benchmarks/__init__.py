"""The benchmarks, a package run from the checkout's root: ``python -m benchmarks.<name> --help``.

Each writes its results under ``benchmarks/results/``; the jobs they start come from the shared
harness ``ds_checkfree.testing``, what only benchmarks need from ``benchmarks._runs``.
"""
