"""meshrun's benchmarks: each figure as a ratio against a baseline measured in the same run.

`meshrun bench` (benchmarks.runner) runs them; benchmarks/README.md records the
latest figures. Each module measures one thing and exposes NAME, TITLE and
run(ctx) -> BenchResult.
"""
