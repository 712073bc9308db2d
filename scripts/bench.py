#!/usr/bin/env python3
"""Side-by-side swap benchmark: vswapfs, zram (lzo-rle, lz4), zswap, a swapfile.

    python3 scripts/bench.py [--rounds 3] [--limit 64] [--out bench-results] [--only a,b]
    python3 scripts/bench.py --render bench-results/bench.json [--out DIR]

See vswapfs/bench.py for what is measured and how.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vswapfs.bench import main

sys.exit(main())
