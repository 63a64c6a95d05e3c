"""``python -m megatron_stgc <command> [flags]`` (also under torchrun ``-m``)."""

import sys

from megatron_stgc.cli import main

# The guard matters: megatron's checkpoint writer starts a "spawn" helper
# process, which re-imports the main module.
if __name__ == "__main__":
    sys.exit(main())
