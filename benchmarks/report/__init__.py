"""BENCHMARKS.md's generator: the prose in Markdown templates, the tables and figures from the results store.

template.md (and the partials beside it) hold every sentence; ``render`` fills their placeholders with what
the modules here compute from benchmarks/results/: the paper table and its variants (paper.py), the seeds
statistics (seeds.py), the methods comparison and zoo (methods.py, zoo.py), the single-purpose
benchmarks (sections.py) and the figures (plots.py). ``python -m benchmarks.make_report`` writes it.
"""
