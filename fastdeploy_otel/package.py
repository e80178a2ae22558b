"""The FastDeploy distributions the instrumentor applies to (the opentelemetry-python-contrib convention).

FastDeploy 2.x is published once per accelerator as ``fastdeploy-<device>`` (its setup.py names the
wheel after the device Paddle was built for); any one of them is enough.  The unrelated
``fastdeploy`` 0.x–1.x toolkit on PyPI is not listed.
"""

from __future__ import annotations

DEVICES = ("gpu", "cpu", "xpu", "npu", "rocm", "iluvatar-gpu", "gcu", "dcu")

_instruments: tuple[str, ...] = ()
_instruments_any: tuple[str, ...] = tuple(f"fastdeploy-{device} >= 2.0" for device in DEVICES)
