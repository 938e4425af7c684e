"""Batch function: the Distributed Map's worker and the job's final step (template.yaml's
BatchStateMachine).

- A batch (``{"Items": [...], "BatchInput": {"job": {...}}}``, :mod:`treeserve.batch.events`):
  each listed object is scored into ``batch/<model>/<job>/output/`` by
  :class:`treeserve.batch.worker.BatchWorker`; returns ``{"objects": [...]}`` (rows, or the
  reason a malformed object was not scored). Storage trouble raises: the state machine retries.
- The final step (``{"finalize": {...}, "started": ...}``): the job manifest, from the map's
  ResultWriter output (:func:`treeserve.batch.jobs.finalize_job`); raises ``JobFailed`` after
  writing it when the map itself failed, so the execution fails too.

One function for both: the final step needs the same bucket access and the same library, and a
second function would be a second artifact and cold start for a few reads and one write.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from treeserve.aws import s3_client
from treeserve.batch.events import Finalize, parse_event
from treeserve.batch.jobs import JobFailed, finalize_job
from treeserve.batch.worker import BatchWorker
from treeserve.settings import Settings

logger = Logger()
metrics = Metrics()
tracer = Tracer()
copy_config_to_registered_loggers(source_logger=logger, include={"treeserve"})

settings = Settings.from_env()
worker = BatchWorker(
    settings.model_bucket,
    chunk_rows=settings.batch_chunk_rows,
    part_bytes=settings.batch_part_bytes,
)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Score a batch of objects, or write the job manifest."""
    request = parse_event(event)
    if isinstance(request, Finalize):
        manifest = finalize_job(
            s3_client(),
            settings.model_bucket,
            request.job,
            results_key=request.results_key,
            map_run_arn=request.map_run_arn,
            map_error=request.map_error,
            started=request.started,
        )
        summary = {k: manifest[k] for k in ("model", "job", "version", "status", "rows")}
        logger.info("job manifest written", extra=summary)
        if manifest["status"] == "failed":
            raise JobFailed(f"the map stopped: {request.map_error}; manifest written")
        return {**summary, "objects_failed": manifest["objects_failed"]}
    results = worker.score_items(request.job, request.items)
    metrics.add_metadata(key="job", value=request.job.job)
    metrics.add_metric("BatchRowsScored", MetricUnit.Count, sum(r.rows for r in results))
    metrics.add_metric(
        "BatchObjectsFailed", MetricUnit.Count, sum(r.status == "failed" for r in results)
    )
    return {"job": request.job.job, "objects": [r.to_dict() for r in results]}
