"""Step Functions on one machine: template.yaml's state machines run in-process, behind a tiny
Step Functions endpoint, so ``treeserve batch`` talks to the local stack as it talks to AWS.

moto's Step Functions cannot run this: it refuses ``ItemBatcher`` and does not invoke Lambda
tasks. So the local stack reads each ``AWS::Serverless::StateMachine`` from template.yaml (its
``Definition`` with ``DefinitionSubstitutions`` applied, :func:`state_machines`) and
:class:`LocalRunner` interprets the subset of the Amazon States Language the definitions use:

- ``Task`` states on ``arn:aws:states:::lambda:invoke`` (``Parameters.FunctionName``,
  ``Payload``; the result is ``{"Payload", "StatusCode"}``) or a bare function ARN, the function
  being the template's own handler, invoked in-process (``invoke``); ``Retry`` (``ErrorEquals``,
  ``IntervalSeconds``, ``MaxAttempts``, ``BackoffRate``) and ``Catch``; an error is the
  exception's class name (what Lambda reports as ``errorType``) and its cause the error payload;
- ``Map`` states in ``DISTRIBUTED`` mode: the ``ItemReader`` (``arn:aws:states:::s3:listObjectsV2``,
  items ``{"Etag", "Key", "LastModified", "Size", "StorageClass"}``, listed from the S3 this
  process talks to; or ``arn:aws:states:::s3:getObject`` with ``ReaderConfig.InputType: JSON``,
  the object a JSON array whose elements are the items, anything else ``States.ItemReaderFailed``),
  the ``ItemBatcher`` (``MaxItemsPerBatch`` or ``MaxItemsPerBatchPath``, ``MaxInputBytesPerBatch``
  or ``MaxInputBytesPerBatchPath``: a reference path into the state's input naming a positive
  integer; ``BatchInput`` with ``key.$`` paths over the state's input: children get
  ``{"Items": [...], "BatchInput": {...}}``), ``MaxConcurrency``
  (threads), ``ToleratedFailurePercentage`` / ``ToleratedFailureCount`` (past them, the map fails
  with ``States.ExceedToleratedFailureThreshold`` and the batches not started are PENDING), and
  the ``ResultWriter`` output as Step Functions writes it: ``<prefix>/<map run id>/manifest.json``
  naming ``SUCCEEDED_0.json``, ``FAILED_0.json``, ``PENDING_0.json``; the map's result is
  ``{"MapRunArn", "ResultWriterDetails": {"Bucket", "Key"}}``;
- ``Pass``, ``Succeed``, ``Fail``; JSONPath ``InputPath``, ``Parameters`` (``key.$``),
  ``ResultSelector``, ``ResultPath``, ``OutputPath`` over ``$`` and the context object ``$$``
  (``$$.Execution.Id``, ``.Name``, ``.StartTime``, ``.Input``).

Anything else fails the execution with ``States.Runtime`` naming what the runner lacks, and so
does a state field the Amazon States Language does not have (Step Functions refuses such a
definition when it is created: a misspelt field must not pass locally).

:class:`LocalStepFunctions` keeps executions (each runs on a thread) and answers StartExecution,
DescribeExecution, ListExecutions and StopExecution as the JSON 1.0 protocol does;
:class:`StepFunctionsEndpoint` serves that on loopback (``X-Amz-Target:
AWSStepFunctions.<Operation>``), which boto3 reaches through ``AWS_ENDPOINT_URL_SFN``.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from treeserve.errors import ConfigurationError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from treeserve_cli.template import Template

logger = logging.getLogger("treeserve_cli.stepfunctions")

LAMBDA_INVOKE = "arn:aws:states:::lambda:invoke"
LIST_OBJECTS = "arn:aws:states:::s3:listObjectsV2"
GET_OBJECT = "arn:aws:states:::s3:getObject"
PUT_OBJECT = "arn:aws:states:::s3:putObject"
MAX_THREADS = 16  # local cap on MaxConcurrency: the machine is a laptop
_SUB = re.compile(r"\$\{([A-Za-z0-9_]+)\}")


@dataclass(frozen=True)
class StateMachineDef:
    """One ``AWS::Serverless::StateMachine`` of the template, its definition resolved."""

    logical_id: str
    name: str
    arn: str
    definition: dict[str, Any] = field(repr=False)


def _substitute(value: Any, subs: Mapping[str, Any]) -> Any:
    if isinstance(value, str):
        return _SUB.sub(lambda m: str(subs.get(m.group(1), m.group(0))), value)
    if isinstance(value, list):
        return [_substitute(v, subs) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, subs) for k, v in value.items()}
    return value


def state_machines(template: Template) -> dict[str, StateMachineDef]:
    """Every state machine of the template, by logical id, as it would be deployed."""
    found: dict[str, StateMachineDef] = {}
    region, account = template.pseudo["AWS::Region"], template.pseudo["AWS::AccountId"]
    for logical_id, props in template.resources_of_type("AWS::Serverless::StateMachine").items():
        definition = props.get("Definition")
        if not isinstance(definition, dict):
            raise ConfigurationError(
                f"template: {logical_id} needs an inline Definition for the local stack"
            )
        subs = props.get("DefinitionSubstitutions") or {}
        name = str(props.get("Name") or f"{template.pseudo['AWS::StackName']}-{logical_id}")
        arn = f"arn:aws:states:{region}:{account}:stateMachine:{name}"
        found[logical_id] = StateMachineDef(logical_id, name, arn, _substitute(definition, subs))
    return found


def function_arns(template: Template) -> dict[str, str]:
    """Function ARN (as the definitions name them) -> logical id."""
    return {str(template.get_att(lid, "Arn")): lid for lid in template.functions()}


# --- the interpreter ---------------------------------------------------------------------------


class StatesError(Exception):
    """A state's error as Step Functions names it (``Error``, ``Cause``)."""

    def __init__(self, error: str, cause: str = "") -> None:
        super().__init__(f"{error}: {cause}")
        self.error, self.cause = error, cause


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def json_path(document: Any, path: str, context: Mapping[str, Any]) -> Any:
    """``$``, ``$.a.b``, ``$$.Execution.Id`` (the reference paths the definitions use)."""
    if path.startswith("$$"):
        node: Any = context
        rest = path[2:]
    elif path.startswith("$"):
        node = document
        rest = path[1:]
    else:
        raise StatesError("States.Runtime", f"{path!r} is not a path")
    for part in [p for p in rest.split(".") if p]:
        if not isinstance(node, Mapping) or part not in node:
            raise StatesError("States.Runtime", f"the path {path!r} names nothing in the input")
        node = node[part]
    return node


def apply_template(template: Any, document: Any, context: Mapping[str, Any]) -> Any:
    """A ``Parameters``-style template: ``"key.$": path`` takes the path's value."""
    if isinstance(template, dict):
        out: dict[str, Any] = {}
        for key, value in template.items():
            if key.endswith(".$"):
                out[key[:-2]] = json_path(document, str(value), context)
            else:
                out[key] = apply_template(value, document, context)
        return out
    if isinstance(template, list):
        return [apply_template(v, document, context) for v in template]
    return template


def _set_path(document: Any, path: str | None, value: Any) -> Any:
    if path is None:
        return document
    if path == "$":
        return value
    if not path.startswith("$."):
        raise StatesError("States.Runtime", f"ResultPath {path!r} is not supported locally")
    out = copy.deepcopy(document) if isinstance(document, dict) else {}
    node = out
    parts = path[2:].split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


# The fields of each state type (JSONPath), as the Amazon States Language defines them.
_COMMON = {"Type", "Comment", "InputPath", "OutputPath", "Assign", "QueryLanguage"}
_FIELDS: dict[str, set[str]] = {
    "Pass": _COMMON | {"Parameters", "Result", "ResultPath", "Next", "End"},
    "Succeed": _COMMON,
    "Fail": {"Type", "Comment", "Error", "Cause", "ErrorPath", "CausePath", "QueryLanguage"},
    "Task": _COMMON
    | {
        "Resource",
        "Parameters",
        "ResultSelector",
        "ResultPath",
        "Retry",
        "Catch",
        "TimeoutSeconds",
        "TimeoutSecondsPath",
        "HeartbeatSeconds",
        "HeartbeatSecondsPath",
        "Credentials",
        "Next",
        "End",
    },
    "Map": _COMMON
    | {
        "ItemProcessor",
        "Iterator",
        "ItemReader",
        "ItemSelector",
        "Parameters",
        "ItemsPath",
        "ItemBatcher",
        "ResultWriter",
        "ResultSelector",
        "ResultPath",
        "MaxConcurrency",
        "MaxConcurrencyPath",
        "ToleratedFailurePercentage",
        "ToleratedFailurePercentagePath",
        "ToleratedFailureCount",
        "ToleratedFailureCountPath",
        "Label",
        "Retry",
        "Catch",
        "Next",
        "End",
    },
}


def _check_fields(name: str, state: Mapping[str, Any]) -> None:
    kind = str(state.get("Type"))
    unknown = sorted(set(state) - _FIELDS.get(kind, set(state)))
    if unknown:
        raise StatesError(
            "States.Runtime",
            f"state {name!r} ({kind}) has fields the States Language does not: {unknown}",
        )


def _matches(names: list[str], error: str) -> bool:
    return (
        "States.ALL" in names
        or error in names
        or ("States.TaskFailed" in names and error != "States.Timeout")
    )


Invoke = Callable[[str, Any], Any]


class LocalRunner:
    """Runs a definition: ``invoke(function_arn, payload)`` calls a function, ``s3`` is the S3
    the item reader and result writer use. ``retry_scale`` multiplies retry intervals."""

    def __init__(self, invoke: Invoke, s3: S3Client, *, retry_scale: float = 1.0) -> None:
        self.invoke, self.s3, self.retry_scale = invoke, s3, retry_scale

    def run(self, definition: Mapping[str, Any], document: Any, context: dict[str, Any]) -> Any:
        states = definition.get("States") or {}
        name = definition.get("StartAt")
        while True:
            state = states.get(name)
            if not isinstance(state, dict):
                raise StatesError("States.Runtime", f"no state {name!r}")
            document, name = self._state(str(name), state, document, context)
            if name is None:
                return document

    def _state(
        self, name: str, state: dict[str, Any], document: Any, context: dict[str, Any]
    ) -> tuple[Any, str | None]:
        kind = state.get("Type")
        _check_fields(name, state)
        if kind == "Succeed":
            return document, None
        if kind == "Fail":
            raise StatesError(str(state.get("Error", "States.Fail")), str(state.get("Cause", "")))
        effective = json_path(document, state.get("InputPath", "$"), context)
        try:
            if kind == "Pass":
                result = state.get("Result", effective)
                if "Parameters" in state:
                    result = apply_template(state["Parameters"], effective, context)
            elif kind == "Task":
                result = self._with_retries(state, lambda: self._task(state, effective, context))
            elif kind == "Map":
                result = self._map(name, state, effective, context)
            else:
                raise StatesError("States.Runtime", f"state type {kind!r} is not run locally")
        except StatesError as exc:
            for catcher in state.get("Catch") or []:
                if _matches(list(catcher.get("ErrorEquals") or []), exc.error):
                    caught = {"Error": exc.error, "Cause": exc.cause}
                    return _set_path(document, catcher.get("ResultPath", "$"), caught), str(
                        catcher["Next"]
                    )
            raise
        if "ResultSelector" in state:
            result = apply_template(state["ResultSelector"], result, context)
        output = _set_path(document, state.get("ResultPath", "$"), result)
        output = json_path(output, state.get("OutputPath", "$"), context)
        return output, None if state.get("End") else str(state.get("Next"))

    def _with_retries(self, state: dict[str, Any], call: Callable[[], Any]) -> Any:
        attempts: dict[int, int] = {}
        while True:
            try:
                return call()
            except StatesError as exc:
                for i, retrier in enumerate(state.get("Retry") or []):
                    if _matches(list(retrier.get("ErrorEquals") or []), exc.error):
                        done = attempts.get(i, 0)
                        if done >= int(retrier.get("MaxAttempts", 3)):
                            raise
                        attempts[i] = done + 1
                        interval = float(retrier.get("IntervalSeconds", 1))
                        backoff = float(retrier.get("BackoffRate", 2.0))
                        time.sleep(interval * backoff**done * self.retry_scale)
                        break
                else:
                    raise

    def _task(self, state: dict[str, Any], document: Any, context: dict[str, Any]) -> Any:
        resource = str(state.get("Resource", ""))
        params = apply_template(state.get("Parameters", document), document, context)
        if resource == LAMBDA_INVOKE:
            payload = params.get("Payload", document) if isinstance(params, dict) else document
            function = str(params.get("FunctionName")) if isinstance(params, dict) else ""
            return {"Payload": self._call(function, payload), "StatusCode": 200}
        if resource.startswith("arn:aws:lambda:"):
            return self._call(resource, params)
        raise StatesError("States.Runtime", f"Task resource {resource!r} is not run locally")

    def _call(self, function: str, payload: Any) -> Any:
        try:
            result = self.invoke(function, json.loads(json.dumps(payload)))
        except StatesError:
            raise
        except Exception as exc:  # the function failed: Lambda reports errorType and the payload
            cause = {"errorMessage": str(exc), "errorType": type(exc).__name__}
            raise StatesError(type(exc).__name__, json.dumps(cause)) from exc
        return json.loads(json.dumps(result, default=str))

    # --- Distributed Map ----------------------------------------------------------------------

    def _items(self, state: dict[str, Any], document: Any, context: dict[str, Any]) -> list[Any]:
        reader = state.get("ItemReader")
        if not reader:
            items = json_path(document, state.get("ItemsPath", "$"), context)
            if not isinstance(items, list):
                raise StatesError("States.Runtime", "the Map's items are not a list")
            return items
        params = apply_template(reader.get("Parameters") or {}, document, context)
        resource = reader.get("Resource")
        if resource == GET_OBJECT:
            return self._json_items(reader, params)
        if resource != LIST_OBJECTS:
            raise StatesError("States.Runtime", f"ItemReader {resource!r} is not run locally")
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=params["Bucket"], Prefix=params.get("Prefix", "")
        )
        return [
            {
                "Etag": o["ETag"],
                "Key": o["Key"],
                "LastModified": int(o["LastModified"].timestamp()),
                "Size": o["Size"],
                "StorageClass": o.get("StorageClass", "STANDARD"),
            }
            for page in pages
            for o in page.get("Contents", [])
        ]

    def _json_items(self, reader: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        """``s3:getObject`` with ``InputType: JSON``: the object is a JSON array of the items."""
        kind = (reader.get("ReaderConfig") or {}).get("InputType")
        if kind != "JSON":
            raise StatesError("States.Runtime", f"ItemReader InputType {kind!r} is not run locally")
        bucket, key = str(params.get("Bucket")), str(params.get("Key"))
        try:
            extra = {"VersionId": params["VersionId"]} if "VersionId" in params else {}
            body = self.s3.get_object(Bucket=bucket, Key=key, **extra)["Body"].read()
        except Exception as exc:  # what S3 said, as the map reports it
            raise StatesError(
                "States.ItemReaderFailed", f"cannot read s3://{bucket}/{key}: {exc}"
            ) from exc
        try:
            items = json.loads(body)
        except ValueError:
            items = None
        if not isinstance(items, list):
            raise StatesError(
                "States.ItemReaderFailed", f"s3://{bucket}/{key} does not hold a JSON array"
            )
        return items

    @staticmethod
    def _batch_limit(
        batcher: dict[str, Any], field: str, document: Any, context: dict[str, Any]
    ) -> int | None:
        """``field`` (a number) or ``field + "Path"`` (a reference path to a positive integer)."""
        if f"{field}Path" in batcher:
            value = json_path(document, str(batcher[f"{field}Path"]), context)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StatesError(
                    "States.Runtime", f"{field}Path names {value!r}, not a positive integer"
                )
            return value
        return int(batcher[field]) if batcher.get(field) else None

    @staticmethod
    def _batches(
        items: list[Any],
        batch_input: Any,
        *,
        most: int | None,
        limit: int | None,
        batched: bool,
    ) -> list[Any]:
        if not batched:
            return items
        most = most or len(items) or 1
        limit = limit or 256 * 1024

        def size(batch: list[Any]) -> int:
            return len(json.dumps({"Items": batch, "BatchInput": batch_input}))

        batches: list[list[Any]] = []
        current: list[Any] = []
        for item in items:
            if current and (len(current) >= most or size([*current, item]) > limit):
                batches.append(current)
                current = []
            current.append(item)
        if current:
            batches.append(current)
        return [
            {"Items": b, **({"BatchInput": batch_input} if batch_input is not None else {})}
            for b in batches
        ]

    def _map(self, name: str, state: dict[str, Any], document: Any, context: dict[str, Any]) -> Any:
        processor = state.get("ItemProcessor") or state.get("Iterator") or {}
        if (processor.get("ProcessorConfig") or {}).get("Mode") != "DISTRIBUTED":
            raise StatesError("States.Runtime", "only Distributed Map states are run locally")
        items = self._items(state, document, context)
        batcher = state.get("ItemBatcher") or {}
        batch_input = (
            apply_template(batcher["BatchInput"], document, context)
            if "BatchInput" in batcher
            else None
        )
        inputs = self._batches(
            items,
            batch_input,
            most=self._batch_limit(batcher, "MaxItemsPerBatch", document, context),
            limit=self._batch_limit(batcher, "MaxInputBytesPerBatch", document, context),
            batched=bool(batcher),
        )
        execution = context["Execution"]
        run_id = str(uuid.uuid4())
        machine = context["StateMachine"]["Name"]
        map_run_arn = (
            execution["Id"].replace(":execution:", ":mapRun:").rsplit(":", 1)[0]
            + f"/{state.get('Label', name)}:{run_id}"
        )
        tolerated_pct = float(state.get("ToleratedFailurePercentage", 0))
        tolerated_count = int(state.get("ToleratedFailureCount", 0))
        threads = max(1, min(int(state.get("MaxConcurrency") or MAX_THREADS), MAX_THREADS))
        records: list[dict[str, Any] | None] = [None] * len(inputs)
        failed = 0
        exceeded = False
        with ThreadPoolExecutor(threads, thread_name_prefix=f"map-{machine}") as pool:
            futures: dict[Future[dict[str, Any]], int] = {}
            pending = list(enumerate(inputs))
            while pending or futures:
                while pending and len(futures) < threads and not exceeded:
                    i, child = pending.pop(0)
                    futures[pool.submit(self._child, processor, child, context, map_run_arn, i)] = i
                if not futures:
                    break
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for future in done:
                    i = futures.pop(future)
                    records[i] = future.result()
                    if records[i]["Status"] == "FAILED":  # type: ignore[index]
                        failed += 1
                        total = len(inputs) or 1
                        if failed > tolerated_count and 100.0 * failed / total > tolerated_pct:
                            exceeded = True
                if exceeded and pending:
                    for i, child in pending:
                        records[i] = self._record(child, "PENDING", map_run_arn, i, context)
                    pending = []
        output = self._write_results(
            state, document, context, map_run_arn=map_run_arn, run_id=run_id, records=records
        )
        if exceeded:
            raise StatesError(
                "States.ExceedToleratedFailureThreshold",
                f"{failed} of {len(inputs)} child executions failed, more than the map tolerates",
            )
        return output

    def _record(
        self, child: Any, status: str, map_run_arn: str, i: int, context: dict[str, Any]
    ) -> dict[str, Any]:
        now = _iso(datetime.now(UTC))
        name = f"{map_run_arn.rsplit(':', 1)[-1]}_{i}"
        return {
            "ExecutionArn": map_run_arn.replace(":mapRun:", ":execution:") + f":{name}",
            "Input": json.dumps(child),
            "InputDetails": {"Included": True},
            "Name": name,
            "RedriveCount": 0,
            "RedriveStatus": "NOT_REDRIVABLE" if status == "SUCCEEDED" else "REDRIVABLE",
            "StartDate": now,
            "StateMachineArn": context["StateMachine"]["Id"],
            "Status": status,
            "StopDate": now,
        }

    def _child(
        self,
        processor: dict[str, Any],
        child: Any,
        context: dict[str, Any],
        map_run_arn: str,
        i: int,
    ) -> dict[str, Any]:
        started = _iso(datetime.now(UTC))
        try:
            output = self.run(processor, child, context)
        except StatesError as exc:
            record = self._record(child, "FAILED", map_run_arn, i, context)
            record.update({"Error": exc.error, "Cause": exc.cause, "StartDate": started})
            return record
        record = self._record(child, "SUCCEEDED", map_run_arn, i, context)
        record.update(
            {
                "Output": json.dumps(output),
                "OutputDetails": {"Included": True},
                "StartDate": started,
            }
        )
        return record

    def _write_results(
        self,
        state: dict[str, Any],
        document: Any,
        context: dict[str, Any],
        *,
        map_run_arn: str,
        run_id: str,
        records: list[dict[str, Any] | None],
    ) -> Any:
        writer = state.get("ResultWriter")
        if not writer:
            return [json.loads(r["Output"]) if r and "Output" in r else r for r in records]
        if writer.get("Resource") != PUT_OBJECT:
            raise StatesError("States.Runtime", f"ResultWriter {writer.get('Resource')!r} locally")
        params = apply_template(writer.get("Parameters") or {}, document, context)
        bucket, prefix = str(params["Bucket"]), str(params.get("Prefix", "")).rstrip("/")
        base = f"{prefix}/{run_id}" if prefix else run_id
        files: dict[str, list[dict[str, Any]]] = {"FAILED": [], "PENDING": [], "SUCCEEDED": []}
        for status, named in files.items():
            chosen = [r for r in records if r is not None and r["Status"] == status]
            if not chosen:
                continue
            key = f"{base}/{status}_0.json"
            body = json.dumps(chosen).encode()
            self.s3.put_object(Bucket=bucket, Key=key, Body=body)
            named.append({"Key": key, "Size": len(body)})
        manifest = {"DestinationBucket": bucket, "MapRunArn": map_run_arn, "ResultFiles": files}
        key = f"{base}/manifest.json"
        self.s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(manifest).encode())
        return {"MapRunArn": map_run_arn, "ResultWriterDetails": {"Bucket": bucket, "Key": key}}


# --- executions and the endpoint ---------------------------------------------------------------


class ServiceError(Exception):
    """An API error as the JSON protocol returns it (``__type``, ``message``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Execution:
    arn: str
    name: str
    machine: StateMachineDef
    input: str
    start: datetime
    status: str = "RUNNING"
    stop: datetime | None = None
    output: str | None = None
    error: str | None = None
    cause: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "executionArn": self.arn,
            "stateMachineArn": self.machine.arn,
            "name": self.name,
            "status": self.status,
            "startDate": self.start.timestamp(),
            "input": self.input,
        }
        if self.stop is not None:
            out["stopDate"] = self.stop.timestamp()
        if self.output is not None:
            out["output"] = self.output
        if self.error is not None:
            out["error"], out["cause"] = self.error, self.cause or ""
        return out


class LocalStepFunctions:
    """The executions of the template's state machines, each run on a thread."""

    def __init__(self, machines: Mapping[str, StateMachineDef], runner: LocalRunner) -> None:
        self.machines = {m.arn: m for m in machines.values()}
        self.runner = runner
        self._executions: dict[str, Execution] = {}
        self._lock = threading.Lock()

    def start_execution(self, machine_arn: str, name: str | None, text: str) -> Execution:
        machine = self.machines.get(machine_arn)
        if machine is None:
            raise ServiceError(
                "StateMachineDoesNotExist", f"State Machine Does Not Exist: '{machine_arn}'"
            )
        name = name or str(uuid.uuid4())
        try:
            document = json.loads(text or "{}")
        except ValueError:
            raise ServiceError("InvalidExecutionInput", "the input is not JSON") from None
        arn = machine.arn.replace(":stateMachine:", ":execution:") + f":{name}"
        with self._lock:
            if arn in self._executions:
                raise ServiceError("ExecutionAlreadyExists", f"Execution Already Exists: '{arn}'")
            execution = Execution(arn, name, machine, text or "{}", datetime.now(UTC))
            self._executions[arn] = execution
        threading.Thread(
            target=self._run, args=(execution, document), name=f"sfn-{name}", daemon=True
        ).start()
        return execution

    def _run(self, execution: Execution, document: Any) -> None:
        context = {
            "Execution": {
                "Id": execution.arn,
                "Name": execution.name,
                "StartTime": _iso(execution.start),
                "Input": document,
            },
            "StateMachine": {"Id": execution.machine.arn, "Name": execution.machine.name},
        }
        try:
            output = self.runner.run(execution.machine.definition, document, context)
        except StatesError as exc:
            execution.error, execution.cause, execution.status = exc.error, exc.cause, "FAILED"
            logger.warning("execution %s failed: %s", execution.name, exc)
        except Exception as exc:  # a bug of the runner: the execution fails, the stack stays up
            logger.exception("execution %s failed in the local runner", execution.name)
            execution.error, execution.cause = "States.Runtime", f"{type(exc).__name__}: {exc}"
            execution.status = "FAILED"
        else:
            execution.output, execution.status = json.dumps(output), "SUCCEEDED"
        execution.stop = datetime.now(UTC)
        execution.done.set()

    def execution(self, arn: str) -> Execution:
        found = self._executions.get(arn)
        if found is None:
            raise ServiceError("ExecutionDoesNotExist", f"Execution Does Not Exist: '{arn}'")
        return found

    def list_executions(self, machine_arn: str, status: str | None = None) -> list[Execution]:
        if machine_arn not in self.machines:
            raise ServiceError(
                "StateMachineDoesNotExist", f"State Machine Does Not Exist: '{machine_arn}'"
            )
        found = [
            e
            for e in self._executions.values()
            if e.machine.arn == machine_arn and (status is None or e.status == status)
        ]
        return sorted(found, key=lambda e: e.start, reverse=True)

    def handle(self, operation: str, body: dict[str, Any]) -> dict[str, Any]:
        """One API call of the JSON protocol."""
        if operation == "StartExecution":
            e = self.start_execution(
                str(body.get("stateMachineArn")), body.get("name"), str(body.get("input", "{}"))
            )
            return {"executionArn": e.arn, "startDate": e.start.timestamp()}
        if operation == "DescribeExecution":
            return self.execution(str(body.get("executionArn"))).describe()
        if operation == "ListExecutions":
            found = self.list_executions(str(body.get("stateMachineArn")), body.get("statusFilter"))
            return {
                "executions": [
                    {
                        k: v
                        for k, v in e.describe().items()
                        if k not in ("input", "output", "error", "cause")
                    }
                    for e in found
                ]
            }
        raise ServiceError("UnknownOperationException", f"{operation} is not served locally")


class StepFunctionsEndpoint:
    """``LocalStepFunctions`` over HTTP on loopback, as boto3's ``stepfunctions`` client calls it."""

    def __init__(self, service: LocalStepFunctions, host: str, port: int) -> None:
        self.service = service

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                target = self.headers.get("X-Amz-Target", "")
                operation = target.rpartition(".")[2]
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                    status, answer = 200, service.handle(operation, body)
                except ServiceError as exc:
                    status, answer = 400, {"__type": exc.code, "message": exc.message}
                except ValueError:
                    status, answer = (
                        400,
                        {"__type": "SerializationException", "message": "bad JSON"},
                    )
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.0")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug(format, *args)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="sfn-endpoint", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
