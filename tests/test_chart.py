"""/status's chart: the Wilson interval and the PNG."""

from __future__ import annotations

import pytest

from bot.chart import draw_status_chart, wilson
from bot.store import Version


def test_wilson_interval():
    assert wilson(10, 0.5) == pytest.approx((0.2366, 0.7634), abs=1e-4)     # 5 of 10
    lo, hi = wilson(20, 0.0)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)             # none of 20 liked: not "0% for sure"
    assert wilson(0, 0.0) == (0.0, 1.0)


def test_chart_is_a_png_written_atomically(tmp_path):
    def version(i, status="published", **metrics):
        return Version(i, i - 1 if i else None, None, None, status, "", metrics, float(i))

    versions = [version(0), version(1, rm_heldout_auc=0.61, rm_heldout_accuracy=0.7), version(2, "rejected"),
                version(3, rm_heldout_auc=0.72)]
    ratings = {0: (40, 0.2), 1: (25, 0.36), 3: (3, 0.67)}
    path = draw_status_chart(versions, ratings, 3, tmp_path / "status.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.png"]     # no temp file left behind
