#!/usr/bin/env python
"""Seed-paired studies from a grid file: the same as ``megatron-stgc study`` (docs/STUDY.md).

    python tools/study.py --grid examples/study/digits.yaml --output runs/study
    python tools/study.py --grid examples/study/digits.yaml --output runs/study --launcher slurm
    python tools/study.py --collect --output runs/study

The code is megatron_stgc/study/; `python tools/study.py --help` lists the flags.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_stgc.study.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
