"""``python -m kernels`` is short for ``python -m kernels.bench``."""

import sys

from kernels.bench import main

sys.exit(main())
