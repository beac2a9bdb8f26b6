"""Side-by-side benchmarks: each module measures cotune against a baseline in the same run.

Run them all with `make bench` (or `python -m bench`), one with `python -m bench sharding`.
A benchmark module exposes `main(argv) -> int` and writes its figures to bench/out/.
"""
