"""The benchmark scripts behind BENCHMARKS.md, each run from the repository's root as ``python -m benchmarks.NAME``.

Results go to the store in benchmarks/results/ (store.py: a folder per experiment, a JSON file per run);
``python -m benchmarks.make_report`` renders BENCHMARKS.md from it. docs/experiments.md lists the experiments.
"""
