"""``python -m effref.kernels`` is short for ``python -m effref.kernels.bench``."""

import sys

from effref.kernels.bench import main

sys.exit(main())
