"""The ``treeserve`` command line: publish, status, promote, rollback, alias, route, monitor,
batch, invoke, local.

This module only parses arguments and dispatches; each command lives in its own module and is
imported when used, so ``treeserve --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from treeserve import __version__
from treeserve.errors import TreeserveError

# command -> "module:function"; the function takes the parsed namespace and returns an exit code.
COMMANDS = {
    "publish": "treeserve_cli.commands:publish",
    "status": "treeserve_cli.commands:status",
    "promote": "treeserve_cli.commands:promote",
    "rollback": "treeserve_cli.commands:rollback",
    "alias": "treeserve_cli.commands:alias",
    "route": "treeserve_cli.commands:route",
    "monitor": "treeserve_cli.monitoring_cli:monitor",
    "batch": "treeserve_cli.batch_cli:batch_command",
    "invoke": "treeserve_cli.invoke:invoke_command",
    "local": "treeserve_cli.local:local_command",
}


def _common(p: argparse.ArgumentParser, *, name: bool = True) -> None:
    p.add_argument(
        "--bucket",
        help="model bucket (default: $MODEL_BUCKET); endpoints come from $AWS_ENDPOINT_URL",
    )
    if name:
        p.add_argument("--name", help="model name (default: $MODEL_NAME or 'default')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="treeserve",
        description="Put XGBoost models into production on AWS Lambda: serve, refresh, monitor.",
    )
    parser.add_argument("--version", action="version", version=f"treeserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "publish",
        help="upload a model (or a package) to incoming/<name>/ for validation and promotion",
        description="Pack MODEL (a .ubj/.json XGBoost model, or a .tar.gz package) with an "
        "optional reference sample and holdout, and upload it to incoming/<name>/. The refresh "
        "function validates, gates and promotes it (or rejects it with a reason).",
        epilog="exit codes: 0 uploaded (with --wait: promoted, registered or a duplicate), "
        "2 rejected, 3 no verdict within --timeout, 1 any other error",
    )
    p.add_argument(
        "model", metavar="MODEL", help="path to model.ubj, model.json or a .tar.gz package"
    )
    _common(p)
    p.add_argument(
        "--reference", metavar="CSV", help="training-feature sample with a header (drift baseline)"
    )
    p.add_argument("--holdout", metavar="CSV", help="features plus the label column (quality gate)")
    p.add_argument("--label", metavar="COL", help="label column of --holdout (required with it)")
    p.add_argument(
        "--class-names",
        metavar="A,B,...",
        help="labels of classes 0, 1, ... in class order, comma-separated (written into the "
        "package's manifest.json; XGBoost's files keep no class names)",
    )
    p.add_argument("--wait", action="store_true", help="wait for the verdict and print it")
    p.add_argument(
        "--timeout", type=float, default=300.0, help="seconds --wait waits (default 300)"
    )

    p = sub.add_parser(
        "status",
        help="every model (version in service, aliases, versions); then one model's version in "
        "service (or a broken pointer), aliases, routing, versions and their footprints, "
        "rejections",
    )
    _common(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser(
        "promote",
        help="put VERSION in service",
        description="Show the latest live evidence for VERSION (the newest monitoring report's "
        "challenger comparison: rows, agreement, metric with its interval, verdict), then put it "
        "in service (a compare-and-swap on registry/<name>/current.json).",
    )
    p.add_argument("version", metavar="VERSION", type=int)
    _common(p)

    p = sub.add_parser(
        "rollback",
        help="move the pointer back to the previous (or a given) version; clears the routing "
        "that sent live traffic to the version rolled back from",
    )
    p.add_argument("--to", metavar="VERSION", type=int, help="version to roll back to")
    _common(p)

    p = sub.add_parser(
        "alias",
        help="set or clear a named pointer (e.g. challenger), served at /models/NAME@ALIAS/...",
        description="alias set ALIAS VERSION points ALIAS at a registered version; alias clear "
        "ALIAS removes it. Both are a compare-and-swap on registry/<name>/aliases/<alias>.json. "
        "'champion' is the version in service: move it with promote or rollback.",
    )
    p.add_argument("action", choices=("set", "clear"))
    p.add_argument("alias", metavar="ALIAS")
    p.add_argument("version", metavar="VERSION", type=int, nargs="?")
    _common(p)

    p = sub.add_parser(
        "route",
        help="send live traffic to an alias: a canary answers PERCENT of requests, a shadow "
        "scores a SAMPLE of the champion's captured rows; no option: print the routing",
        description="Changes registry/<name>/routing.json by compare-and-swap; each option "
        "replaces its part and keeps the other. A canary answers PERCENT (0-100] of the model's "
        "unpinned requests (/predict, /explain, /models/NAME/..., /v2/models/NAME/infer), chosen "
        "from the request's row ids (else its x-request-id header, else API Gateway's request "
        "id, which a retry does not keep), so the same ids always reach the same version; "
        "name@alias and /versions/N routes are never rerouted. A shadow's SAMPLE (0-1] of the "
        "champion's captured rows is scored by the alias in the monitoring function, never "
        "answered with. The alias must be set (`treeserve alias set`). Inference picks the "
        "change up within MODEL_REFRESH_SECONDS; a rollback clears the parts pointing at the "
        "version rolled back from.",
    )
    _common(p)
    p.add_argument(
        "--canary",
        nargs=2,
        metavar=("ALIAS", "PERCENT"),
        help="ALIAS answers PERCENT (0-100] of unpinned requests",
    )
    p.add_argument(
        "--shadow",
        nargs=2,
        metavar=("ALIAS", "SAMPLE"),
        help="ALIAS also scores SAMPLE (0-1] of the champion's captured rows (off the request path)",
    )
    p.add_argument("--off", action="store_true", help="clear the canary and the shadow")

    p = sub.add_parser(
        "monitor",
        help="run monitoring now and write a report",
        description="Drift, data quality and performance of the window's captured traffic, and "
        "challengers routed live traffic compared with the champion (one line each). "
        "PROMOTION_MODE=live in the environment lets this run promote a challenger, as the "
        "scheduled run does.",
    )
    _common(p)
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report")
    p.add_argument(
        "--hours", type=float, default=24.0, help="window of captures to read (default 24)"
    )

    p = sub.add_parser(
        "batch",
        help="batch scoring on Step Functions: submit a job over S3 objects, show its status",
        description="submit PREFIX scores every object (CSV with a header, JSON Lines) under "
        "batch/<model>/<job>/input/ with one pinned model version, one output per object under "
        "batch/<model>/<job>/output/ and a job manifest; status JOB shows progress, rows and "
        "failures.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = actions.add_parser(
        "submit",
        help="start a batch scoring job",
        description="PREFIX is a job's input prefix (batch/<model>/<job>/input/, or "
        "s3://<bucket>/batch/...), or a local folder or file, uploaded to "
        "batch/<name>/<job>/input/ first (job: --job or a new id). The model version is pinned "
        "now: --version, --alias, or the champion.",
        epilog="exit codes: 0 started (with --wait: every object scored), 2 some objects failed "
        "or the job failed, 3 still running after --timeout, 1 any other error",
    )
    b.add_argument("prefix", metavar="PREFIX", help="input prefix, or a local folder/file")
    _common(b)
    pin = b.add_mutually_exclusive_group()
    pin.add_argument("--version", type=int, metavar="V", help="score with registered version V")
    pin.add_argument("--alias", metavar="A", help="score with the version alias A names")
    b.add_argument("--job", metavar="JOB", help="job id for a local folder (default: a new one)")
    b.add_argument("--wait", action="store_true", help="follow the job (progress on stderr)")
    b.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds --wait waits (default 3600)"
    )
    b.add_argument("--state-machine", metavar="ARN", help="default: $BATCH_STATE_MACHINE_ARN")
    b = actions.add_parser("status", help="a job's progress, rows and failures")
    b.add_argument("job", metavar="JOB")
    _common(b)
    b.add_argument("--json", action="store_true", help="print JSON")
    b.add_argument("--state-machine", metavar="ARN", help="default: $BATCH_STATE_MACHINE_ARN")

    p = sub.add_parser(
        "invoke",
        help="invoke a function of template.yaml in-process, like `sam local invoke`",
    )
    p.add_argument(
        "function", metavar="FUNCTION", help="logical id in template.yaml, e.g. InferenceFunction"
    )
    p.add_argument("--event", metavar="FILE", required=True, help="event JSON file ('-' for stdin)")
    p.add_argument(
        "--template", default="template.yaml", help="SAM template (default template.yaml)"
    )
    p.add_argument(
        "--env-vars", metavar="FILE", help="JSON of environment overrides, as sam's --env-vars"
    )

    p = sub.add_parser(
        "local", help="the local stack: moto server, refresh on upload, API on :3000"
    )
    p.add_argument("--port", type=int, default=3000, help="API port (default 3000)")
    p.add_argument(
        "--moto-port", type=int, default=5000, help="embedded AWS (moto) port (default 5000)"
    )
    p.add_argument(
        "--template", default="template.yaml", help="SAM template (default template.yaml)"
    )
    p.add_argument(
        "--sfn-port",
        type=int,
        default=8083,
        help="local Step Functions endpoint (batch scoring) port (default 8083)",
    )
    p.add_argument("--no-demo", action="store_true", help="start without publishing the demo model")
    p.add_argument(
        "--monitor-every",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="run the monitoring function every SECONDS (default 300; 0: only on demand)",
    )
    p.add_argument(
        "--env",
        action="append",
        metavar="NAME=VALUE",
        help="override a function environment variable (repeatable), e.g. "
        "--env MODEL_REFRESH_SECONDS=1",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module_name, func_name = COMMANDS[args.command].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(args))
    except TreeserveError as exc:
        sys.stderr.write(f"treeserve {args.command}: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
