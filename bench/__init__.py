"""casd benchmarks: the machine's own limits, then casd against them, in one run.

`python -m bench` (full: 1 GiB file, 200,000-chunk manifest, 200 files) or
`python -m bench --quick` (a smoke run in well under a minute). See bench/RESULTS.md.
"""
