"""Compare KV-cache policies on real coding-agent traces under increasing memory pressure.

The command line of :mod:`cwsim.compare` (what it runs, its outputs, its flags: ``--help``).
"""

import sys

from cwsim.compare import *  # noqa: F401,F403  (the experiment's API, for scripts that load this file)
from cwsim.compare import main

if __name__ == "__main__":
    sys.exit(main())
