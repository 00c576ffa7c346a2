"""SRD metrics from the src catalogs (rule validate_metrics): JSON, an HTML table for the report, a log table."""
import html
import json
from typing import TYPE_CHECKING

from snakedrp import log as sdlog
from snakedrp.repo.io import write_text
from snakedrp.validate.metrics import MetricsConfig, compute_metrics, format_table, read_visit_sources

if TYPE_CHECKING:
    from snakemake.script import snakemake


def html_table(metrics, summary) -> str:
    """A standalone HTML page of the metrics (the report shows it as it is)."""
    colour = {"PASS": "#d4edda", "FAIL": "#f8d7da", "NOT COMPUTED": "#fff3cd", "n/a": "#eeeeee"}
    head = ("metric", "filter", "value", "unit", "n", "minimum / design / stretch", "reaches", "goal", "status", "note")
    rows = []
    for m in metrics:
        status = m.status() + (f" (by {m.miss:.3g} {m.unit})" if m.passed is False else "")
        spec = " / ".join(f"{m.spec[k]:g}" for k in ("minimum", "design", "stretch")) if m.spec else "—"
        cells = (m.name, m.filter, f"{m.value:.3g}" if m.computed else "—", m.unit, m.n, spec, m.level,
                 f"{m.goal_level} ≤ {m.goal:g}" if m.spec else "—", status, m.note)
        rows.append(f'<tr style="background:{colour[m.status()]}">' +
                    "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    fields = "".join(f"<li>{html.escape(f)}: {s['stars']} stars matched in visits {s['visits']}, "
                     f"field {s['field_arcmin'][0]}' x {s['field_arcmin'][1]}'</li>" for f, s in summary.items())
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>SRD metrics</title>"
            "<style>body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse}"
            "td,th{border:1px solid #999;padding:3px 6px;vertical-align:top}td:nth-child(-n+9){white-space:nowrap}th{background:#ddd}</style></head><body>"
            "<h2>Survey metrics (LSST SRD, validate_drp definitions)</h2>"
            f"<table id='srd-metrics'><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>{''.join(rows)}</table>"
            f"<ul>{fields}</ul></body></html>")


def main(inputs, outputs, params, log_path):
    logger = sdlog.configure(log_path)
    config = MetricsConfig.from_dict(params.config["metrics"])
    strict = config.strict
    sources = read_visit_sources(inputs.srcs, params.data_ids, config)
    logger.info("%d candidate star measurements from %d src catalogs", len(sources), len(inputs.srcs))
    metrics, summary = compute_metrics(sources, config)
    for f, s in summary.items():
        logger.info("%s: %d stars matched across visits %s; field %.1f' x %.1f'", f, s["stars"], s["visits"],
                    *s["field_arcmin"])
    logger.info("SRD metrics:\n%s", format_table(metrics))
    for m in metrics:
        logger.info(m.line())
    missed = [m for m in metrics if m.passed is False]
    report = {"goal_level": config.goal_level, "strict": strict, "fields": summary,
              "metrics": [m.to_dict() for m in metrics], "missed": [m.line() for m in missed]}
    write_text(json.dumps(report, indent=2), outputs.metrics)
    write_text(html_table(metrics, summary), outputs.table)
    if missed:
        text = "; ".join(m.line() for m in missed)
        if strict:
            raise SystemExit(f"metrics: goal(s) missed (metrics.strict): {text}")
        logger.warning("metrics: %d goal(s) missed (reported, not failing: metrics.strict is false): %s",
                       len(missed), text)


main(snakemake.input, snakemake.output, snakemake.params, snakemake.log[0])
