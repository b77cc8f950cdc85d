"""``python -m npu_rft`` is the CLI, so that ``torchrun -m npu_rft train ...`` works."""
import sys

from npu_rft.cli import main

if __name__ == "__main__":
    sys.exit(main())
