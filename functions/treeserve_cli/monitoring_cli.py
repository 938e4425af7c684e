"""``treeserve monitor``: run monitoring now, print a summary, write the report (and HTML)."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from treeserve.errors import TreeserveError
from treeserve.settings import Settings


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _rule(rule: dict[str, Any] | None) -> str:
    if not rule:
        return "-"
    measure = {"psi": "PSI", "ks": "KS", "wasserstein": "W/sd"}.get(rule["method"], "?")
    return f"{measure}>={rule['threshold']:g}"


def print_summary(report: dict[str, Any], out: TextIO) -> None:
    """A human summary: window, rows, then one line per feature of each version."""
    s = report["summary"]
    w = report["window"]
    out.write(f"model {report['model']}  window {w['start']} .. {w['end']}\n")
    out.write(
        f"status {report['status']}  rows {report['rows']:,}  files {report['files']}  "
        f"malformed {report['malformed_rows']}  labels {report['labels_available']:,}\n"
    )
    if report["status"] == "no data":
        out.write("no data: no captured rows in the window\n")
    for v in report["versions"]:
        out.write(
            f"\nversion {v['version']}: {v['rows']:,} rows, reference from "
            f"{v.get('reference_source')}{'  ERROR ' + v['error'] if v.get('error') else ''}\n"
        )
        rows = [
            (
                "feature",
                "kind",
                "rows",
                "missing",
                "PSI",
                "JS",
                "KS",
                "W/sd",
                "test",
                "p(BH)",
                "rule",
                "drift",
                "flags",
            )
        ]
        for f in [*v.get("features", []), *v.get("predictions", [])]:
            rows.append(
                (
                    str(f["name"]),
                    f["kind"],
                    f"{f['n']:,}",
                    _fmt(f["missing_rate"]),
                    _fmt(f["psi"]),
                    _fmt(f["js_distance"]),
                    _fmt(f.get("ks_statistic")),
                    _fmt(f.get("wasserstein_normed")),
                    f["test"] or "-",
                    _fmt(f["p_adjusted"]),
                    _rule(f.get("rule")),
                    f["severity"] if f["drifted"] else "-",
                    ",".join(f["flags"]) or "-",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            out.write("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() + "\n")
    out.write(
        f"\ndrifted features: {', '.join(s['drifted_features']) or 'none'}; prediction drift "
        f"(max PSI) {_fmt(s['prediction_drift'])}{' DRIFTED' if s['prediction_drifted'] else ''}\n"
    )
    if s["performance"]:
        perf = ", ".join(f"{k} {_fmt(v, 4)}" for k, v in s["performance"].items())
        out.write(f"performance: {perf}\n")
    from treeserve.monitoring.challenger import summary_lines  # noqa: PLC0415 - keeps --help fast

    for line in summary_lines(report.get("challenger")):
        out.write(line + "\n")


def monitor(args: argparse.Namespace) -> int:
    """Run monitoring for the last ``--hours`` hours; 0 when it ran (drift or not)."""
    settings = Settings.from_env(bucket=args.bucket)
    name = args.name or settings.model_name
    hours = float(args.hours)
    if not 0 < hours <= 24 * 366:
        raise TreeserveError(f"--hours must be in (0, {24 * 366}], got {args.hours}")
    from treeserve.monitoring.pipeline import run_monitoring  # noqa: PLC0415 - keeps --help fast

    end = datetime.now(UTC)

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty():
            sys.stderr.write(f"\rreading captures: {done}/{total} files")
            if done == total:
                sys.stderr.write("\n")

    report = run_monitoring(
        settings.model_bucket,
        name,
        end - timedelta(hours=hours),
        end,
        progress=progress,
        rule=settings.drift_rule,
        settings=settings,
    )
    print_summary(report, sys.stdout)
    sys.stdout.write(f"report: s3://{settings.model_bucket}/{report['report_key']}\n")
    if args.html:
        from treeserve_cli.report_html import render_html  # noqa: PLC0415

        path = Path(args.html)
        path.write_text(render_html(report), encoding="utf-8")
        sys.stdout.write(f"html: {path}\n")
    return 0
