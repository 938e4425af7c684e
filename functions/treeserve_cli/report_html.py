"""A monitoring report as one self-contained HTML file (inline CSS and SVG, no external URL).

Summary first (window, rows, drifted features, prediction drift, performance), then the
challengers on live traffic (agreement, shift, latency, metric with its bootstrap interval,
verdict, decision, the row counts behind them) when a routing sent them traffic, then per model
version a table of every feature's statistics and one chart per feature: the reference and the
current share of rows in each bin (the PSI bins, plus missing), drifted features highlighted.
The SVG is written by hand so the CLI needs no plotting library.
"""

from __future__ import annotations

from html import escape
from typing import Any

MAX_BARS = 30
CHART_W, CHART_H, PAD_L, PAD_B, PAD_T = 420, 170, 34, 46, 10

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}h3{font-size:15px;margin:4px 0}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}
tr.drift td{background:#fde8e8}.badge{display:inline-block;padding:1px 8px;border-radius:9px;
background:#e8f4e8;color:#185a18}.badge.bad{background:#fde8e8;color:#8a1414}
.grid{display:flex;flex-wrap:wrap;gap:14px}.card{border:1px solid #ddd;border-radius:6px;
padding:8px}.card.drift{border:2px solid #c62828}.muted{color:#777}
svg text{font-size:9px;fill:#444}.ref{fill:#9e9e9e}.cur{fill:#1565c0}.card.drift .cur{fill:#c62828}
"""


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return escape(str(value))


def _signed(value: Any) -> str:
    """An improvement: its sign always shown (> 0: the challenger is better), as the CLI does."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:+.4g}"
    return _num(value)


def chart_svg(feature: dict[str, Any], css_class: str = "chart feature") -> str:
    """Grouped bars: reference vs current share per bin of one feature."""
    chart = feature.get("chart") or {}
    labels: list[str] = list(chart.get("labels") or [])
    cur: list[float] = list(chart.get("current") or [0.0] * len(labels))
    ref: list[float] | None = chart.get("reference")
    idx = list(range(len(labels)))
    if len(idx) > MAX_BARS:  # keep the bins that matter most, in their order
        weight = [max(cur[i], ref[i] if ref else 0.0) for i in idx]
        idx = sorted(sorted(idx, key=lambda i: -weight[i])[:MAX_BARS])
    top = max([*(cur[i] for i in idx), *((ref[i] for i in idx) if ref else ()), 1e-9])
    plot_w = CHART_W - PAD_L - 6
    plot_h = CHART_H - PAD_B - PAD_T
    slot = plot_w / max(len(idx), 1)
    bar = max(slot * 0.38, 1.0)
    parts = [
        f'<svg class="{css_class}" width="{CHART_W}" '
        f'height="{CHART_H}" viewBox="0 0 {CHART_W} {CHART_H}" role="img" '
        f'aria-label="reference vs current: {escape(str(feature.get("name")))}">',
        f'<line x1="{PAD_L}" y1="{PAD_T + plot_h}" x2="{CHART_W - 6}" y2="{PAD_T + plot_h}" '
        'stroke="#999"/>',
        f'<text x="{PAD_L - 4}" y="{PAD_T + 8}" text-anchor="end">{top:.0%}</text>',
        f'<text x="{PAD_L - 4}" y="{PAD_T + plot_h}" text-anchor="end">0</text>',
    ]
    for n, i in enumerate(idx):
        x = PAD_L + n * slot + slot * 0.1
        for k, (series, cls) in enumerate(((ref, "ref"), (cur, "cur"))):
            if series is None:
                continue
            h = plot_h * series[i] / top
            parts.append(
                f'<rect class="{cls}" x="{x + k * bar:.1f}" y="{PAD_T + plot_h - h:.1f}" '
                f'width="{bar:.1f}" height="{h:.1f}"><title>{cls}: {series[i]:.2%}</title></rect>'
            )
        lx, ly = x + bar, PAD_T + plot_h + 6
        parts.append(
            f'<text x="{lx:.1f}" y="{ly}" transform="rotate(45 {lx:.1f} {ly})">'
            f"{escape(labels[i][:14])}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _feature_row(f: dict[str, Any]) -> str:
    cls = ' class="drift"' if f.get("drifted") else ""
    return (
        f"<tr{cls}><td class=l>{escape(str(f.get('name')))}</td><td class=l>{f.get('kind')}</td>"
        f"<td>{_num(f.get('n'))}</td><td>{_num(f.get('missing_rate'), 3)}</td>"
        f"<td>{_num(f.get('psi'))}</td><td>{_num(f.get('js_distance'))}</td>"
        f"<td class=l>{escape(str(f['test'])) if f.get('test') else '&ndash;'}</td><td>{_num(f.get('statistic'))}</td>"
        f"<td>{_num(f.get('p_adjusted'), 3)}</td><td>{_num(f.get('out_of_range_share'), 3)}</td>"
        f"<td class=l>{escape(f.get('severity', 'none'))}</td>"
        f"<td class=l>{escape(', '.join(f.get('flags') or []))}</td></tr>"
    )


HEADER = (
    "<tr><th class=l>feature</th><th class=l>kind</th><th>rows</th><th>missing</th><th>PSI</th>"
    "<th>JS</th><th class=l>test</th><th>statistic</th><th>p (BH)</th><th>out of range</th>"
    "<th class=l>drift</th><th class=l>flags</th></tr>"
)


def _cards(features: list[dict[str, Any]], css_class: str) -> str:
    cards = []
    for f in features:
        drifted = " drift" if f.get("drifted") else ""
        note = (
            "" if (f.get("chart") or {}).get("reference") is not None else " (no reference counts)"
        )
        cards.append(
            f'<div class="card{drifted}"><h3>{escape(str(f.get("name")))} '
            f'<span class="muted">PSI {_num(f.get("psi"), 3)}{note}</span></h3>'
            f"{chart_svg(f, css_class)}</div>"
        )
    return '<div class="grid">' + "".join(cards) + "</div>"


def _challenger_rows(entry: dict[str, Any]) -> str:
    rows = entry.get("rows") or {}
    agree = entry.get("agreement") or {}
    shift = entry.get("shift") or {}
    q = entry.get("quality") or {}
    ci = q.get("ci") or [None, None]
    metric = (
        f"{escape(str(q['metric']))} {_num(q.get('champion'))} → {_num(q.get('challenger'))}; "
        f"improvement {_signed(q.get('improvement'))} [{_signed(ci[0])}, {_signed(ci[1])}]"
        if q.get("metric")
        else escape(str(q.get("error") or "no metric yet"))
    )
    verdict = str(entry.get("verdict"))
    good = verdict in ("better", "not worse")
    decision = entry.get("decision") or {}
    cells = [
        ("alias", f"{escape(str(entry.get('alias')))} (v{_num(entry.get('version'))}, "
         f"{escape('+'.join(entry.get('routes') or []))})"),
        ("rows compared", f"{_num(rows.get('compared'))} ({_num(rows.get('canary'))} canary, "
         f"{_num(rows.get('shadow'))} shadow; {_num(rows.get('labeled'))} labeled)"),
        ("agreement", f"{_num(agree.get('agreement'), 4)} ({escape(str(agree.get('kind')))})"
         + (f", mean |Δ| {_num(agree.get('mean_abs_diff'))}" if "mean_abs_diff" in agree else "")),
        ("score shift", f"PSI {_num(shift.get('psi'), 3)}, KS {_num(shift.get('ks_statistic'), 3)}"),
        ("metric (95% CI, paired bootstrap)", metric),
        ("verdict", f'<span class="badge{"" if good else " bad"}">{escape(verdict)}</span> '
         f"{escape(str(entry.get('reason') or ''))}"),
        ("decision", f"{escape(str(decision.get('action')))}: "
         f"{escape(str(decision.get('reason') or ''))}"),
    ]  # fmt: skip
    return "".join(f"<tr><th class=l>{k}</th><td class=l>{v}</td></tr>" for k, v in cells)


def _challengers(section: dict[str, Any]) -> list[str]:
    out = ["<h2>Challengers on live traffic</h2>"]
    champion = (section.get("champion") or {}).get("version")
    boot = section.get("bootstrap") or {}
    out.append(
        f"<p>Champion v{_num(champion)} · PROMOTION_MODE {escape(str(section.get('mode')))} · "
        f"tolerance {_num(section.get('tolerance'))} · at least "
        f"{_num(section.get('min_labeled_rows'))} labeled rows · {_num(boot.get('resamples'))} "
        f"bootstrap resamples (seed {escape(str(boot.get('seed')))}) · {_num(section.get('scored_rows'))}"
        f" rows scored{' (stopped at the row budget)' if section.get('truncated') else ''}</p>"
    )
    if section.get("error"):
        out.append(f"<p class=muted>{escape(str(section['error']))}</p>")
    latency = section.get("latency") or {}
    if latency:
        rows = "".join(
            f"<tr><td class=l>{escape(a)}</td><td>{_num(v.get('rows'))}</td>"
            f"<td>{_num(v.get('p50_ms'), 3)}</td><td>{_num(v.get('p95_ms'), 3)}</td></tr>"
            for a, v in latency.items()
        )
        out.append(
            "<table><tr><th class=l>alias</th><th>rows</th><th>p50 ms</th><th>p95 ms</th></tr>"
            f"{rows}</table>"
        )
    for entry in section.get("challengers") or []:
        out.append(f"<table>{_challenger_rows(entry)}</table>")
    return out


def render_html(report: dict[str, Any]) -> str:
    """The whole report as an HTML document."""
    s = report.get("summary", {})
    drifted = s.get("drifted_features") or []
    badge = (
        f'<span class="badge bad">{len(drifted)} drifted: {escape(", ".join(drifted))}</span>'
        if drifted
        else '<span class="badge">no drift</span>'
    )
    perf = s.get("performance") or {}
    perf_rows = "".join(
        f"<tr><td class=l>{escape(k)}</td><td>{_num(v)}</td></tr>" for k, v in perf.items()
    )
    window = report.get("window", {})
    out = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>treeserve monitoring: {escape(str(report.get('model')))}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Monitoring report: {escape(str(report.get('model')))}</h1>",
        f"<p>{escape(str(window.get('start')))} to {escape(str(window.get('end')))} · "
        f"status <b>{escape(str(report.get('status')))}</b> · rows {_num(report.get('rows'))} "
        f"in {_num(report.get('files'))} files · malformed {_num(report.get('malformed_rows'))}"
        f" · {badge}</p>",
        f"<p>Prediction drift (max PSI): {_num(s.get('prediction_drift'), 3)}"
        f"{' — drifted' if s.get('prediction_drifted') else ''}. Thresholds: BH-adjusted p &lt; "
        f"{_num((s.get('thresholds') or {}).get('alpha'))} and PSI ≥ "
        f"{_num((s.get('thresholds') or {}).get('psi_moderate'))} "
        f"(major ≥ {_num((s.get('thresholds') or {}).get('psi_major'))}).</p>",
    ]
    flagged = s.get("quality_flagged_features") or []
    if flagged:
        out.append(
            "<p>Data-quality flags (missing-rate rise, out of range, new categories) on: "
            f"<b>{escape(', '.join(flagged))}</b>.</p>"
        )
    if report.get("message"):
        out.append(f"<p class=muted>{escape(str(report['message']))}</p>")
    if perf_rows:
        out.append(f"<h2>Performance (labelled rows)</h2><table>{perf_rows}</table>")
    if report.get("challenger"):
        out.extend(_challengers(report["challenger"]))
    for v in report.get("versions", []):
        out.append(
            f"<h2>Version {_num(v.get('version'))} · {_num(v.get('rows'))} rows · "
            f"reference from {escape(str(v.get('reference_source')))}</h2>"
        )
        if v.get("error"):
            out.append(f"<p class=muted>{escape(str(v['error']))}</p>")
        features = v.get("features") or []
        if features:
            out.append("<table>" + HEADER + "".join(_feature_row(f) for f in features) + "</table>")
            out.append("<h3>Features: reference (grey) vs current</h3>")
            out.append(_cards(features, "chart feature"))
        predictions = v.get("predictions") or []
        if predictions:
            out.append("<h3>Predictions</h3>")
            out.append(
                "<table>" + HEADER + "".join(_feature_row(p) for p in predictions) + "</table>"
            )
            out.append(_cards(predictions, "chart prediction"))
    out.append(
        f"<p class=muted>generated {escape(str(report.get('generated_at')))}"
        f"{' · ' + escape(str(report['report_key'])) if report.get('report_key') else ''}</p>"
    )
    out.append("</body></html>")
    return "\n".join(out)
