"""Where reuse-aware policies pay: each policy's ratio to vllm across workload regimes.

The command line of :mod:`cwsim.regimes` (what it runs, its outputs, its flags: ``--help``).
"""

import sys

from cwsim.regimes import main

if __name__ == "__main__":
    sys.exit(main())
