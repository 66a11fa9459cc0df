"""Train, validate, test or predict with vmamba's Lightning CLI.

    python train.py fit --config configs/quickstart.yaml

Same as the installed ``vmamba-train`` command; see docs/training.md.
"""

import sys

from vmamba.cli import main

if __name__ == "__main__":
    sys.exit(main())
