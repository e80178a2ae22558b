"""A short soak in CI: unique prompts at concurrency 4, RSS of the engine and the API server sampled.

Before the fix the engine grew by ~8.2 KB per request (Paddle's ``to_tensor`` keeps ~104 bytes per call);
the bound here is well under that and well over the noise of a sound build.  The long run is by hand:
``python -m minifd.soak --seconds 1800`` (docs/RELIABILITY.md).
"""

from __future__ import annotations

import pytest

pytest.importorskip("paddle")
from minifd.soak import soak  # noqa: E402
from minifd.stack import Stack  # noqa: E402

MAX_KB_PER_REQUEST = 4.0


def test_soak_rss_is_flat_per_request(tmp_path):
    with Stack(trace_mode="all", log_dir=str(tmp_path)) as stack:
        report = soak(stack, seconds=40, warmup_seconds=15, concurrency=4, sample_every_s=1.0)
    print(report.summary())
    assert report.errors == 0 and report.requests > 300, report.summary()
    for role in ("engine", "api"):
        assert report.kb_per_request(role) < MAX_KB_PER_REQUEST, report.summary()
