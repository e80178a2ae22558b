"""Benchmarks: fastdeploy_otel against FastDeploy's legacy trace.log path.

``python -m bench [--quick] [--json FILE]``; see docs/BENCHMARKS.md.
"""

import os
import sys

# The example serving stack is not installed: it is imported from the checkout's examples/.
_EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
if _EXAMPLES not in sys.path:
    sys.path.insert(0, _EXAMPLES)
