#!/usr/bin/env python
"""Maintainer script: the kernel benchmark, same options as ``npu-rft bench-kernels``.

    python tools/bench_kernels.py --quick
    python tools/bench_kernels.py --shape 1024,896,151936 --repeats 5 --json bench.json
"""
import sys

from npu_rft.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-kernels", *sys.argv[1:]]))
