"""The HTML report's challenger section (treeserve_cli.report_html): what it prints as written."""

from __future__ import annotations

from typing import Any

from treeserve_cli.report_html import _challengers


def section(improvement: float, ci: tuple[float, float]) -> dict[str, Any]:
    return {
        "status": "ok",
        "champion": {"version": 1},
        "mode": "auto",
        "tolerance": 0.0,
        "min_labeled_rows": 100,
        "scored_rows": 180,
        "bootstrap": {"resamples": 1000, "seed": 20261202},
        "challengers": [
            {
                "alias": "challenger",
                "version": 2,
                "routes": ["canary"],
                "rows": {"compared": 180, "canary": 180, "shadow": 0, "labeled": 180},
                "quality": {
                    "metric": "auc",
                    "champion": 0.9993,
                    "challenger": 0.9996,
                    "improvement": improvement,
                    "ci": list(ci),
                    "labeled_rows": 180,
                },
                "verdict": "not enough evidence",
            }
        ],
    }


def test_the_bootstrap_seed_is_an_identifier_not_a_count() -> None:
    html = "".join(_challengers(section(0.0003, (-0.0008, 0.0019))))
    assert "(seed 20261202)" in html
    assert "1,000 bootstrap resamples" in html  # a count keeps its separators


def test_improvements_and_their_interval_carry_their_sign() -> None:
    html = "".join(_challengers(section(0.0002676, (-0.0007926, 0.001929))))
    assert "improvement +0.0002676 [-0.0007926, +0.001929]" in html
    html = "".join(_challengers(section(-0.03014, (-0.05766, -0.01016))))
    assert "improvement -0.03014 [-0.05766, -0.01016]" in html
