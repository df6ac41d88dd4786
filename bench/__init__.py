"""
Side-by-side benchmarks: the appliance against a well-known peer, measured
in the same run on the same loopback, printed as a ratio.

Run one with C{python -m bench NAME} from the repository root; C{python -m
bench --list} names them. Not part of the test suite: see
C{docs/benchmarks.md}.
"""
