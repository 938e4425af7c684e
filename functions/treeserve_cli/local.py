"""``treeserve local``: the whole stack on one machine, no AWS account and no Docker.

What runs, all in this process, all on loopback:

- a moto server (``ThreadedMotoServer``) as the embedded AWS; this process, its functions and
  the user's CLI reach it through the standard ``AWS_ENDPOINT_URL``;
- the resources template.yaml declares (bucket, SNS topics, SQS queues), created from the
  template with its intrinsics resolved locally (:mod:`treeserve_cli.template`);
- the bucket's real S3 event notifications for the refresh function's prefix, sent by moto to an
  SQS queue (the local stand-in for the Lambda trigger), long-polled by a thread that invokes the
  refresh handler with the SQS event, through the template's handler wiring;
- a demo model (:mod:`treeserve_cli.demo`) published the way a user would: a package uploaded to
  ``incoming/``, validated and promoted by the refresh handler;
- the inference function under uvicorn, through :class:`LambdaGateway`: each HTTP request becomes
  the HTTP API (payload 2.0) event API Gateway would send, and the function's own Lambda
  handler answers it (Mangum, then its FastAPI app), as in production;
- the monitoring handler on a timer (and on demand: ``treeserve monitor`` with the printed env);
- the template's state machines (batch scoring, monitoring's fan-out) run by
  :mod:`treeserve_cli.stepfunctions` behind a Step Functions endpoint on loopback
  (``AWS_ENDPOINT_URL_SFN``), their Lambda tasks invoking the template's handlers in-process:
  ``treeserve batch submit`` works as against AWS, and a monitoring run over more than
  ``MONITORING_FANOUT_BYTES`` of captures fans out over ``MonitoringMap`` (the function's
  ``MONITORING_STATE_MACHINE_ARN`` names it) and its workers and merge run here.

Ctrl-C (SIGINT) or SIGTERM stops everything and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import errno
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import parse_qsl

from treeserve.errors import ConfigurationError, TreeserveError
from treeserve_cli.invoke import LambdaContext, environment, import_handler, runtime_environment
from treeserve_cli.template import FunctionDef, Template, load_template

# boto3, moto, uvicorn, xgboost and the command modules are imported where they are used (and
# PLC0415 is silenced there): `treeserve local` reports a port in use or a bad option at once,
# before seconds of imports.
if TYPE_CHECKING:
    from moto.server import ThreadedMotoServer
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sns import SNSClient
    from mypy_boto3_sqs import SQSClient

    from treeserve_cli.demo import DemoPackage, PenguinsPackage
    from treeserve_cli.stepfunctions import StepFunctionsEndpoint

logger = logging.getLogger("treeserve_cli.local")

HOST = "127.0.0.1"
REGION = "us-east-1"
# Dummy credentials: the moto server accepts any; real ones must never be sent anywhere by this.
LOCAL_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
}
# Environment that would point boto3 at real AWS or at a profile: dropped in the local stack.
DROPPED_AWS_ENV = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SECURITY_TOKEN", "AWS_CA_BUNDLE")

POLL_WAIT_SECONDS = 1  # SQS long poll: short enough that Ctrl-C stops the poller at once
# A failed refresh invocation is retried like Lambda retries SQS batches: the message becomes
# visible again after this many seconds, up to MAX_RECEIVES times, then goes to the DLQ.
VISIBILITY_TIMEOUT_SECONDS = 10
MAX_RECEIVES = 3
DEMO_TIMEOUT_SECONDS = 120.0
MOTO_START_SECONDS = 20.0
# A demo on a laptop, not production: a promotion is served within seconds, and every predicted
# row is captured and written within seconds, so `treeserve monitor` has traffic to look at.
# Printed at start-up; --env overrides each.
LOCAL_ENV_DEFAULTS = {
    "MODEL_REFRESH_SECONDS": "5",
    "CAPTURE_SAMPLE_RATE": "1",
    "CAPTURE_MAX_AGE_SECONDS": "5",
}


class PortInUse(ConfigurationError):
    """A port the local stack needs is taken by another process."""


# --- ports -------------------------------------------------------------------------------------


def _bind(port: int) -> socket.socket:
    # SO_REUSEADDR as uvicorn and werkzeug set it: a port in TIME_WAIT is free, one listening is not.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except BaseException:
        sock.close()
        raise
    return sock


def reserve_port(port: int, what: str, option: str) -> socket.socket:
    """Bind ``127.0.0.1:port`` now, or raise :class:`PortInUse` naming the port and the option."""
    if not 0 < port < 65536:
        raise ConfigurationError(f"{option} {port}: a port is a number from 1 to 65535")
    try:
        return _bind(port)
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            reason = "is already in use" if exc.errno == errno.EADDRINUSE else "is not allowed"
            raise PortInUse(
                f"port {port} ({what}) {reason} on {HOST}: stop the process using it, or pick "
                f"another port with {option} (e.g. {option} {port + 1})"
            ) from None
        raise


def check_ports(api_port: int, moto_port: int) -> socket.socket:
    """Check both ports before anything starts; returns the API's socket, bound and kept."""
    if api_port == moto_port:
        raise ConfigurationError(
            f"--port and --moto-port are both {api_port}: give them different ports"
        )
    api = reserve_port(api_port, "API", "--port")
    try:
        # moto's server binds its own socket: check now, release, bind again moments later.
        reserve_port(moto_port, "embedded AWS, moto", "--moto-port").close()
    except BaseException:
        api.close()
        raise
    return api


# --- environment -------------------------------------------------------------------------------


def local_aws_env(moto_port: int) -> dict[str, str]:
    """The environment that points boto3 (this process, the functions, the CLI) at moto."""
    return {"AWS_ENDPOINT_URL": f"http://{HOST}:{moto_port}", **LOCAL_AWS_ENV}


def point_at_moto(moto_port: int) -> None:
    """Point every AWS client of this process at the moto server (before any client exists)."""
    from treeserve.aws import reset_clients  # noqa: PLC0415

    for name in DROPPED_AWS_ENV:
        os.environ.pop(name, None)
    os.environ.update(local_aws_env(moto_port))
    reset_clients()


# --- S3 notifications -> SQS -> refresh handler ------------------------------------------------


def sqs_event(messages: list[dict[str, Any]], queue_arn: str) -> dict[str, Any]:
    """The event Lambda's SQS trigger gives a function for a batch of received messages."""
    return {
        "Records": [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": m.get("Attributes", {}),
                "messageAttributes": m.get("MessageAttributes", {}),
                "md5OfBody": m.get("MD5OfBody", ""),
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": REGION,
            }
            for m in messages
        ]
    }


def failed_message_ids(result: Any) -> set[str] | None:
    """Ids a handler reported as ``batchItemFailures`` (None: it reported none, all succeeded)."""
    if isinstance(result, Mapping) and isinstance(result.get("batchItemFailures"), list):
        return {
            str(item.get("itemIdentifier"))
            for item in result["batchItemFailures"]
            if isinstance(item, Mapping)
        }
    return None


class NotificationPoller:
    """Long-polls the queue S3 notifies and hands each batch to ``handle`` as an SQS event.

    Like Lambda's SQS trigger: a batch whose invocation raises is left on the queue (it comes back
    after the visibility timeout, and after MAX_RECEIVES goes to the dead-letter queue); with
    ``batchItemFailures`` only those messages stay. ``handled`` counts invocations, for tests.
    """

    def __init__(
        self,
        queue_url: str,
        queue_arn: str,
        handle: Callable[[dict[str, Any]], Any],
        *,
        sqs: SQSClient | None = None,
        wait_seconds: int = POLL_WAIT_SECONDS,
    ) -> None:
        self.queue_url = queue_url
        self.queue_arn = queue_arn
        self._handle = handle
        self._sqs = sqs
        self._wait = wait_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.handled = 0
        self.failed = 0

    @property
    def sqs(self) -> SQSClient:
        if self._sqs is None:
            from treeserve.aws import sqs_client  # noqa: PLC0415

            self._sqs = sqs_client()
        return self._sqs

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="s3-notifications", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:
                if self._stop.is_set():
                    return
                logger.exception("polling the S3 notification queue failed; retrying")
                self._stop.wait(1.0)

    def poll_once(self) -> int:
        """Receive one batch and invoke the handler with it; returns the number of messages."""
        received = self.sqs.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=self._wait,
            AttributeNames=["All"],
        )
        messages: list[dict[str, Any]] = list(received.get("Messages", []))  # type: ignore[arg-type]
        if not messages:
            return 0
        try:
            result = self._handle(sqs_event(messages, self.queue_arn))
        except Exception:
            self.failed += 1
            logger.exception(
                "the refresh function failed on %d S3 notification(s); they will be retried",
                len(messages),
            )
            return len(messages)
        self.handled += 1
        failed = failed_message_ids(result) or set()
        done = [m for m in messages if m["MessageId"] not in failed]
        if done:
            self.sqs.delete_message_batch(
                QueueUrl=self.queue_url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done)
                ],
            )
        return len(messages)


class Every:
    """Calls ``action`` every ``seconds`` on a daemon thread until stopped (a local schedule)."""

    def __init__(self, seconds: float, action: Callable[[], Any], name: str) -> None:
        self.seconds = seconds
        self._action = action
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.runs = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.seconds):
            try:
                self._action()
            except Exception:
                logger.exception(
                    "scheduled %s failed; next run in %s s", self._thread.name, self.seconds
                )
            self.runs += 1


# --- the stack ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalOptions:
    """What ``treeserve local`` was asked for."""

    port: int = 3000
    moto_port: int = 5000
    template: Path = Path("template.yaml")
    demo: bool = True
    monitor_every: float = 300.0  # seconds; 0 turns the timer off
    env: dict[str, str] = field(default_factory=dict)  # overrides for every function's env
    sfn_port: int = 8083  # the local Step Functions endpoint (Step Functions Local's port)


@dataclass(frozen=True, slots=True)
class StackSpec:
    """What the local stack creates and runs, all of it read from template.yaml."""

    bucket: str
    versioned: bool
    incoming_prefix: str
    incoming_events: list[str]
    topics: list[str]  # SNS topic names
    queues: list[str]  # SQS queue names (the refresh function's on-failure destination, ...)
    refresh_failure_queue: str | None
    inference: FunctionDef
    refresh: FunctionDef
    monitoring: FunctionDef | None


@dataclass
class LocalStack:
    """Everything ``treeserve local`` started, in start order; :meth:`stop` undoes it."""

    options: LocalOptions
    spec: StackSpec | None = None
    moto: Any = None
    poller: NotificationPoller | None = None
    timer: Every | None = None
    handlers: dict[str, Callable[..., Any]] = field(default_factory=dict)
    app: LambdaGateway | None = None
    demo_dir: Path | None = None
    demo: DemoPackage | None = None
    demo_version: int | None = None
    penguins: PenguinsPackage | None = None
    penguins_version: int | None = None
    step_functions: StepFunctionsEndpoint | None = None
    state_machine_arn: str | None = None  # batch scoring's (BATCH_STATE_MACHINE_ARN)
    monitoring_map_arn: str | None = None  # the monitoring function's MONITORING_STATE_MACHINE_ARN

    def stop(self) -> None:
        """Stop in reverse start order; every step runs even when an earlier one failed."""
        steps: list[tuple[str, Callable[[], Any]]] = []
        if self.step_functions is not None:
            steps.append(("Step Functions endpoint", self.step_functions.stop))
        if self.timer is not None:
            steps.append(("monitoring timer", self.timer.stop))
        if self.poller is not None:
            steps.append(("S3 notification poller", self.poller.stop))
        if self.app is not None:
            steps.append(("capture flush", self._flush_captures))
            steps.append(("invocation thread", self.app.close))
        if self.moto is not None:
            steps.append(("moto server", self.moto.stop))
        if self.demo_dir is not None:
            demo_dir = self.demo_dir
            steps.append(("demo files", lambda: shutil.rmtree(demo_dir, ignore_errors=True)))
        for what, step in steps:
            try:
                step()
            except Exception:
                logger.exception("stopping the %s failed", what)

    def _captures(self) -> list[Any]:
        """The inference function's capture buffer (its module-level ``capture``), if any."""
        found = []
        for handler in self.handlers.values():
            capture = getattr(sys.modules.get(handler.__module__), "capture", None)
            if callable(getattr(capture, "flush", None)):
                found.append(capture)
        return found

    def _flush_captures(self) -> None:
        # Lambda may lose what an environment buffered (a documented bound); a local stop that
        # the user asked for need not: write the sampled rows while moto is still up.
        for capture in self._captures():
            capture.flush()

    def flush_due_captures(self) -> None:
        """Write captures whose age bound passed even when no request arrives to notice it
        (in Lambda the next request does): `treeserve monitor` sees recent traffic."""
        for capture in self._captures():
            maybe_flush = getattr(capture, "maybe_flush", None)
            if callable(maybe_flush):
                maybe_flush()


_MOTO_S3_LOCK = threading.RLock()


def make_moto_s3_atomic() -> Callable[[], None]:
    """Handle each S3 object request in moto under one lock; returns the undo.

    moto checks If-None-Match / If-Match and then writes without a lock, so under concurrent
    requests two conditional writes can both succeed (measured: 368 "successful" compare-and-swap
    increments moved a counter by 353). Real S3 is atomic per request; the registry relies on it.
    """
    from moto.s3.responses import S3Response  # noqa: PLC0415

    original = S3Response.key_response

    def key_response(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _MOTO_S3_LOCK:
            return original(self, *args, **kwargs)

    S3Response.key_response = key_response  # type: ignore[method-assign]

    def undo() -> None:
        S3Response.key_response = original  # type: ignore[method-assign]

    return undo


def start_moto(port: int) -> ThreadedMotoServer:
    """The embedded AWS: moto's threaded server on loopback (its request log silenced)."""
    from moto.server import ThreadedMotoServer  # noqa: PLC0415

    make_moto_s3_atomic()  # concurrent publishes must not lose a version or a pointer update
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address=HOST, port=port, verbose=False)
    # start() waits, without a timeout, for a server thread that never signals if its bind
    # fails (the port taken since check_ports looked): wait for it on a thread of our own.
    starter = threading.Thread(target=server.start, name="moto-start", daemon=True)
    starter.start()
    starter.join(MOTO_START_SECONDS)
    if starter.is_alive():
        raise TreeserveError(
            f"the embedded AWS (moto) did not start on {HOST}:{port} in {MOTO_START_SECONDS:g} s: "
            f"is the port taken? pick another with --moto-port"
        )
    return server


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While starting up, SIGTERM unwinds like Ctrl-C, so everything started is stopped."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- resources ---------------------------------------------------------------------------------

NOTIFICATION_QUEUE = "treeserve-local-s3-events"


@dataclass(frozen=True, slots=True)
class LocalResources:
    """What :func:`create_resources` made on the moto server."""

    bucket: str
    topic_arns: dict[str, str]
    queue_urls: dict[str, str]
    notification_queue_url: str
    notification_queue_arn: str


def _queue_arn(sqs: SQSClient, url: str) -> str:
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]
    return attrs["QueueArn"]


def create_resources(
    spec: StackSpec,
    *,
    s3: S3Client | None = None,
    sqs: SQSClient | None = None,
    sns: SNSClient | None = None,
) -> LocalResources:
    """Create what the template declares, and route ``incoming/`` notifications to SQS.

    In AWS the bucket notifies the refresh function directly. Locally there is no Lambda service
    to notify, so the bucket notifies an SQS queue on the moto server (moto sends the real
    notification records) and :class:`NotificationPoller` invokes the handler with them.
    """
    from treeserve.aws import s3_client, sns_client, sqs_client  # noqa: PLC0415

    s3 = s3 or s3_client()
    sqs = sqs or sqs_client()
    sns = sns or sns_client()
    s3.create_bucket(Bucket=spec.bucket)
    if spec.versioned:
        s3.put_bucket_versioning(Bucket=spec.bucket, VersioningConfiguration={"Status": "Enabled"})
    topic_arns = {name: sns.create_topic(Name=name)["TopicArn"] for name in spec.topics}
    queue_urls = {name: sqs.create_queue(QueueName=name)["QueueUrl"] for name in spec.queues}

    # Failed refresh invocations end where the template sends them: its on-failure queue.
    dlq_name = spec.refresh_failure_queue or f"{NOTIFICATION_QUEUE}-dlq"
    if dlq_name not in queue_urls:
        queue_urls[dlq_name] = sqs.create_queue(QueueName=dlq_name)["QueueUrl"]
    redrive = {
        "deadLetterTargetArn": _queue_arn(sqs, queue_urls[dlq_name]),
        "maxReceiveCount": MAX_RECEIVES,
    }
    url = sqs.create_queue(
        QueueName=NOTIFICATION_QUEUE,
        Attributes={
            "VisibilityTimeout": str(VISIBILITY_TIMEOUT_SECONDS),
            "RedrivePolicy": json.dumps(redrive),
        },
    )["QueueUrl"]
    arn = _queue_arn(sqs, url)
    queue_config: Any = {
        "Id": "refresh-on-upload",
        "QueueArn": arn,
        "Events": spec.incoming_events,
        "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": spec.incoming_prefix}]}},
    }
    s3.put_bucket_notification_configuration(
        Bucket=spec.bucket, NotificationConfiguration={"QueueConfigurations": [queue_config]}
    )
    return LocalResources(spec.bucket, topic_arns, queue_urls, url, arn)


# --- functions ---------------------------------------------------------------------------------


def context_for(fn: FunctionDef) -> LambdaContext:
    """A fresh Lambda context for one invocation of ``fn`` (its name, memory and timeout)."""
    return LambdaContext(
        function_name=fn.function_name,
        memory_limit_in_mb=fn.memory_size,
        timeout_seconds=fn.timeout,
    )


def own_env(fn: FunctionDef, overrides: Mapping[str, str]) -> dict[str, str]:
    """One function's environment: the template's, then the local defaults, then ``--env``."""
    return {**fn.environment, **LOCAL_ENV_DEFAULTS, **overrides}


def function_env(spec: StackSpec, overrides: Mapping[str, str]) -> dict[str, str]:
    """One environment for the process: the functions' own from the template (inference last,
    so it wins on a clash), then :data:`LOCAL_ENV_DEFAULTS`, then the user's ``--env``. The
    functions share this process, as they share the bucket and settings in AWS."""
    env: dict[str, str] = {}
    for fn in (spec.monitoring, spec.refresh, spec.inference):
        if fn is not None:
            env.update(fn.environment)
    env.update(LOCAL_ENV_DEFAULTS)
    env.update(overrides)
    return env


# --- the API server ----------------------------------------------------------------------------


class LambdaGateway:
    """An ASGI app that does what API Gateway does in front of the inference function: each
    HTTP request becomes an HTTP API (payload 2.0) event (the shape ``sam local start-api`` and
    API Gateway send: lower-case headers, cookies apart, the body base64-encoded), the Lambda
    handler answers it, and its proxy answer becomes the HTTP response. So the local stack runs
    the code production runs, Mangum included, from the event on.

    Invocations run one at a time on one thread with its own event loop, as one Lambda
    execution environment serves them; :meth:`call` runs other work (the periodic capture
    flush) on that thread too.
    """

    def __init__(self, handler: Callable[..., Any], context: Callable[[], Any]) -> None:
        self.handler = handler
        self.context = context
        self.executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="lambda", initializer=_own_event_loop
        )

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the invocation thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    self.executor.shutdown(wait=True)
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        event = http_api_event(scope, b"".join(chunks))
        answer = await self.call(self.handler, event, self.context())
        status, headers, body = proxy_answer(answer)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def close(self) -> None:
        self.executor.shutdown(wait=True)


def _own_event_loop() -> None:
    # Mangum runs each invocation on the thread's event loop, as in the Lambda runtime's
    # main thread; a worker thread has none until given one.
    asyncio.set_event_loop(asyncio.new_event_loop())


def http_api_event(scope: Any, body: bytes) -> dict[str, Any]:
    """The HTTP API (payload 2.0) event API Gateway sends for this ASGI request."""
    headers: dict[str, str] = {}
    cookies: list[str] = []
    for raw_name, raw_value in scope["headers"]:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        if name == "cookie":
            cookies.extend(part.strip() for part in value.split(";") if part.strip())
        else:  # API Gateway joins repeated headers with commas
            headers[name] = f"{headers[name]},{value}" if name in headers else value
    path = scope.get("raw_path") or scope["path"].encode()
    path_text = path.decode("latin-1") if isinstance(path, bytes) else str(path)
    query = scope.get("query_string", b"").decode("latin-1")
    client = scope.get("client") or ("127.0.0.1", 0)
    now = time.time()
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path_text,
        "rawQueryString": query,
        "headers": headers,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "local",
            "domainName": headers.get("host", HOST),
            "domainPrefix": "local",
            "http": {
                "method": scope["method"],
                "path": path_text,
                "protocol": f"HTTP/{scope.get('http_version', '1.1')}",
                "sourceIp": client[0],
                "userAgent": headers.get("user-agent", ""),
            },
            "requestId": str(uuid.uuid4()),
            "routeKey": "$default",
            "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "timeEpoch": int(now * 1000),
        },
        "body": base64.b64encode(body).decode(),
        "isBase64Encoded": True,
    }
    if cookies:
        event["cookies"] = cookies
    if query:
        parameters: dict[str, str] = {}
        for name, value in parse_qsl(query, keep_blank_values=True):
            parameters[name] = f"{parameters[name]},{value}" if name in parameters else value
        event["queryStringParameters"] = parameters
    return event


def proxy_answer(answer: Mapping[str, Any]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of a Lambda proxy answer, as API Gateway sends them on."""
    headers = [
        (str(k).lower().encode("latin-1"), str(v).encode("latin-1"))
        for k, v in (answer.get("headers") or {}).items()
    ]
    for name, values in (answer.get("multiValueHeaders") or {}).items():
        headers.extend((name.lower().encode("latin-1"), str(v).encode("latin-1")) for v in values)
    headers.extend((b"set-cookie", str(c).encode("latin-1")) for c in answer.get("cookies") or [])
    raw = answer.get("body") or ""
    body = base64.b64decode(raw) if answer.get("isBase64Encoded") else str(raw).encode()
    return int(answer.get("statusCode", 200)), headers, body


def make_server(
    app: LambdaGateway,
    port: int,
    every_second: Callable[[], Any] | None = None,
    *,
    log_level: str = "info",
    access_log: bool = True,
) -> Any:
    """A uvicorn server for ``app`` that stops on SIGINT/SIGTERM and lets us exit 0 after.

    uvicorn re-raises the signal it caught once it has shut down (so a bare ``uvicorn`` exits
    like an interrupted process); the local stack has its own shutdown to run after the server
    stops, and ends with exit 0, so it keeps the signal handled. ``every_second`` runs on the
    thread invocations run on (:meth:`LambdaGateway.call`), about once a second.
    """

    import uvicorn  # noqa: PLC0415

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        async def on_tick(self, counter: int) -> bool:
            if every_second is not None and counter % 10 == 0:  # ticks are 0.1 s apart
                try:
                    await app.call(every_second)
                except Exception:
                    logger.exception("the local stack's periodic task failed")
            return await super().on_tick(counter)

    config = uvicorn.Config(
        app,
        host=HOST,
        port=port,
        log_level=log_level,
        access_log=access_log,
        lifespan="auto",
        timeout_graceful_shutdown=5,
    )
    return Server(config)


# --- start-up output ---------------------------------------------------------------------------


def _command(name: str) -> str:
    """How to run ``name`` from this venv as the user's shell will find it."""
    exe = Path(sys.executable).parent / name
    found = shutil.which(name)
    if found and Path(found).resolve() == exe.resolve():
        return name
    if not exe.exists():
        return (
            f"{shlex.quote(sys.executable)} -m treeserve_cli.cli" if name == "treeserve" else name
        )
    try:
        rel = os.path.relpath(exe)
    except ValueError:
        return shlex.quote(str(exe))
    return shlex.quote(rel if not rel.startswith("..") else str(exe))


def _where(fn: FunctionDef) -> str:
    """``functions/refresh/app.handler``: where a function's handler lives, from here."""
    folder = fn.code_uri
    with contextlib.suppress(ValueError):
        folder = folder.resolve().relative_to(Path.cwd().resolve())
    return f"{folder.as_posix()}/{fn.handler}"


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def banner(stack: LocalStack, resources: LocalResources) -> str:
    """What runs where, the environment for the CLI, and examples that work as printed."""
    spec, opts = stack.spec, stack.options
    if spec is None:
        raise TreeserveError("the local stack has not started")
    api = f"http://{HOST}:{opts.port}"
    env = {**local_aws_env(opts.moto_port), "MODEL_BUCKET": spec.bucket}
    env.pop("AWS_REGION")
    env.pop("AWS_SESSION_TOKEN")
    if stack.step_functions is not None and stack.state_machine_arn is not None:
        env["AWS_ENDPOINT_URL_SFN"] = stack.step_functions.url
        env["BATCH_STATE_MACHINE_ARN"] = stack.state_machine_arn
    model_name = function_env(spec, opts.env).get("MODEL_NAME", "default")
    if model_name != "default":
        env["MODEL_NAME"] = model_name
    treeserve = _command("treeserve")
    python = _command("python")
    lines = [
        "",
        "treeserve local: the stack is up (no AWS account, no Docker; everything on loopback)",
        "",
        f"  embedded AWS (moto)  http://{HOST}:{opts.moto_port}",
        f"    bucket             s3://{spec.bucket}",
    ]
    for arn in resources.topic_arns.values():
        lines.append(f"    SNS topic          {arn}")
    for name in resources.queue_urls:
        lines.append(f"    SQS queue          {name}")
    lines += [
        f"  refresh              s3://{spec.bucket}/{spec.incoming_prefix}* ObjectCreated -> SQS "
        f"{NOTIFICATION_QUEUE} -> {spec.refresh.logical_id} ({_where(spec.refresh)})",
        f"  API                  {api}  ({spec.inference.logical_id}, {_where(spec.inference)}; "
        f"docs {api}/docs)",
    ]
    if spec.monitoring is not None:
        when = f"every {opts.monitor_every:g} s" if opts.monitor_every > 0 else "timer off"
        lines.append(
            f"  monitoring           {spec.monitoring.logical_id} {when}; "
            f"on demand: {treeserve} monitor"
        )
    if stack.step_functions is not None:
        lines.append(
            f"  batch scoring        {stack.state_machine_arn} (Distributed Map from template.yaml, "
            f"run locally) on {stack.step_functions.url}: {treeserve} batch submit"
        )
    if stack.step_functions is not None and stack.monitoring_map_arn is not None:
        threshold = function_env(spec, opts.env).get("MONITORING_FANOUT_BYTES", "0")
        lines.append(
            f"  monitoring fan-out   {stack.monitoring_map_arn} (Distributed Map, run locally) "
            f"for windows over MONITORING_FANOUT_BYTES={threshold}"
        )
    demo = stack.demo
    if demo is not None:
        lines.append(
            f"  model in service     {model_name} v{stack.demo_version} (demo: XGBoost on "
            "Breast Cancer Wisconsin "
            f"(Diagnostic), holdout AUC {demo.holdout_auc:.4f}), package {demo.package}"
        )
        penguins = stack.penguins
        if penguins is not None:
            lines.append(
                f"  second model         penguins v{stack.penguins_version} (demo: P(male) on "
                "Palmer Penguins, categorical species/island, holdout AUC "
                f"{penguins.holdout_auc:.4f}), served by name at {api}/models/penguins/..."
            )
    elif stack.penguins is not None:
        lines.append(
            f"  model in service     penguins v{stack.penguins_version} (demo: P(male) on Palmer "
            f"Penguins, categorical species/island, holdout AUC {stack.penguins.holdout_auc:.4f})"
        )
    else:
        lines.append(f"  model in service     none yet: publish one ({treeserve} publish ...)")
    settings = function_env(spec, opts.env)
    local = " ".join(f"{k}={settings[k]}" for k in sorted({*LOCAL_ENV_DEFAULTS, *opts.env}))
    lines.append(f"  local settings       {local} (change with --env NAME=VALUE)")
    lines += [
        "",
        "Try the API (another shell):",
        f"  curl -s {api}/health",
        f"  curl -s {api}/model",
    ]
    if demo is not None:
        rows = {"instances": demo.example_rows}
        lines += [
            "  # two real rows of the holdout (a malignant and a benign mass), in feature order:",
            f"  curl -s {api}/predict -H 'content-type: application/json' -d '{_json(rows)}'",
            "  # records by feature name (absent features are missing values):",
            f"  curl -s {api}/predict -H 'content-type: application/json' -d '"
            + _json(
                {
                    "instances": [
                        dict(zip(demo.feature_names[:3], demo.example_rows[0][:3], strict=True))
                    ]
                }
            )
            + "'",
            "  # CSV in and out (the first 3 rows of the reference sample):",
            f"  head -4 {shlex.quote(str(demo.reference))} | curl -s {api}/predict "
            "-H 'content-type: text/csv' -H 'accept: text/csv' --data-binary @-",
            f"  curl -s {api}/explain -H 'content-type: application/json' "
            f"-d '{_json({'instances': demo.example_rows[:1]})}'",
        ]
    if stack.penguins is not None and demo is not None:
        records = _json({"instances": stack.penguins.example_records})
        lines += [
            "  # every model by name (the short routes above are the default model's):",
            f"  curl -s {api}/models",
            f"  curl -s {api}/models/{model_name}/predict -H 'content-type: application/json' "
            f"-d '{_json({'instances': demo.example_rows[:1]})}'",
            f"  curl -s {api}/models/penguins",
            f"  curl -s {api}/models/penguins/predict -H 'content-type: application/json' "
            f"-d '{records}'",
            f"  curl -s {api}/models/penguins/versions/{stack.penguins_version}/predict "
            f"-H 'content-type: application/json' -d '{records}'",
        ]
    if stack.penguins is not None and demo is None:
        penguins_api = api
        lines += [
            "  # category values as strings (GET /model lists them; a number is the model's code):",
            f"  curl -s {penguins_api}/predict -H 'content-type: application/json' "
            f"-d '{_json({'instances': stack.penguins.example_records})}'",
            f"  head -4 {shlex.quote(str(stack.penguins.reference))} | curl -s "
            f"{penguins_api}/predict -H 'content-type: text/csv' --data-binary @-",
        ]
    lines += [
        "",
        "Use the CLI against this stack (another shell):",
        "  export " + " ".join(f"{k}={v}" for k, v in env.items()),
        f"  {treeserve} status",
        f"  {python} -m treeserve_cli.demo /tmp/treeserve-v2 --rounds 80   # train a second model",
        f"  {treeserve} publish /tmp/treeserve-v2/demo-package.tar.gz --wait",
        f"  {treeserve} rollback",
        f"  {treeserve} monitor --html /tmp/treeserve-monitor.html",
    ]
    if stack.step_functions is not None:
        target = f"--name {model_name}"
        sample = stack.demo.reference if stack.demo is not None else None
        if sample is None and stack.penguins is not None:
            sample, target = stack.penguins.reference, "--name penguins"
        if sample is not None:
            lines += [
                "  # batch scoring: upload a CSV (or a folder of CSV / JSON Lines) and score it",
                f"  {treeserve} batch submit {shlex.quote(str(sample))} {target} --job demo --wait",
                f"  {treeserve} batch status demo {target}",
            ]
    lines += [
        "",
        "Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)


# --- treeserve local ---------------------------------------------------------------------------


def _parse_env(pairs: list[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigurationError(f"--env {pair!r}: write it as NAME=VALUE")
        env[key.strip()] = value
    return env


def options_from_args(args: argparse.Namespace) -> LocalOptions:
    """The :class:`LocalOptions` of a parsed ``treeserve local`` command line."""
    every = float(getattr(args, "monitor_every", 300.0))
    if every < 0:
        raise ConfigurationError(f"--monitor-every {every:g}: give seconds >= 0 (0 turns it off)")
    return LocalOptions(
        port=int(args.port),
        moto_port=int(args.moto_port),
        template=Path(args.template),
        demo=not getattr(args, "no_demo", False),
        monitor_every=every,
        env=_parse_env(getattr(args, "env", None)),
        sfn_port=int(getattr(args, "sfn_port", 8083)),
    )


def _say(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()


def start(options: LocalOptions, out: TextIO) -> tuple[LocalStack, LocalResources]:
    """Start everything but the API server; on failure, stop what was started and raise."""
    stack = LocalStack(options)
    try:
        template = load_template(options.template, region=REGION)
        spec = read_stack(template)
        stack.spec = spec
        _say(out, f"treeserve local: embedded AWS (moto) on http://{HOST}:{options.moto_port}")
        point_at_moto(options.moto_port)
        stack.moto = start_moto(options.moto_port)
        resources = create_resources(spec)
        env = function_env(spec, options.env)
        os.environ.update(env)
        model_name = env.get("MODEL_NAME", "default")
        _say(
            out, f"treeserve local: created s3://{spec.bucket} and the template's topics and queues"
        )

        refresh = load_handler(spec.refresh, own_env(spec.refresh, options.env))
        stack.handlers[spec.refresh.logical_id] = refresh
        stack.poller = NotificationPoller(
            resources.notification_queue_url,
            resources.notification_queue_arn,
            lambda event: refresh(event, context_for(spec.refresh)),
        )
        stack.poller.start()

        if options.demo:
            from treeserve_cli.demo import (  # noqa: PLC0415
                PENGUINS_MODEL,
                write_demo_package,
                write_penguins_package,
            )

            stack.demo_dir = Path(tempfile.mkdtemp(prefix="treeserve-demo-"))
            if model_name != PENGUINS_MODEL:
                _say(out, "treeserve local: training the demo model (Breast Cancer Wisconsin)")
                stack.demo = write_demo_package(stack.demo_dir)
                _say(
                    out,
                    f"treeserve local: publishing it to s3://{spec.bucket}/{spec.incoming_prefix}",
                )
                stack.demo_version = publish_demo(stack.demo.package, spec, model_name)
                _say(
                    out,
                    f"treeserve local: the demo model is version {stack.demo_version}, in service",
                )
            _say(out, "treeserve local: training the categorical demo model (Palmer Penguins)")
            stack.penguins = write_penguins_package(stack.demo_dir / "penguins")
            stack.penguins_version = publish_demo(stack.penguins.package, spec, PENGUINS_MODEL)

        inference = load_handler(spec.inference, own_env(spec.inference, options.env))
        stack.handlers[spec.inference.logical_id] = inference
        stack.app = LambdaGateway(inference, lambda: context_for(spec.inference))

        start_step_functions(stack, template, options)  # before anything can start executions
        if spec.monitoring is not None:
            monitor = load_handler(spec.monitoring, own_env(spec.monitoring, options.env))
            stack.handlers[spec.monitoring.logical_id] = monitor
            if options.monitor_every > 0:
                monitoring_fn = spec.monitoring
                stack.timer = Every(
                    options.monitor_every,
                    lambda: monitor(scheduled_event(), context_for(monitoring_fn)),
                    name="monitoring",
                )
                stack.timer.start()
    except BaseException:
        stack.stop()
        raise
    return stack, resources


def start_step_functions(stack: LocalStack, template: Template, options: LocalOptions) -> None:
    """Serve the template's state machines on loopback; their Lambda tasks call the template's
    handlers in this process (each loaded on first use, with its own environment)."""
    from treeserve.aws import s3_client  # noqa: PLC0415
    from treeserve_cli.stepfunctions import (  # noqa: PLC0415
        LocalRunner,
        LocalStepFunctions,
        StepFunctionsEndpoint,
        function_arns,
        state_machines,
    )

    machines = state_machines(template)
    if not machines:
        return
    by_arn = function_arns(template)
    functions = template.functions()
    lock = threading.Lock()

    def invoke(arn: str, payload: Any) -> Any:
        logical_id = by_arn.get(arn)
        if logical_id is None:
            raise ConfigurationError(f"template: no function with ARN {arn!r}")
        fn = functions[logical_id]
        with lock:
            handler = stack.handlers.get(logical_id)
            if handler is None:
                handler = load_handler(fn, own_env(fn, options.env))
                stack.handlers[logical_id] = handler
        return handler(payload, context_for(fn))

    wiring = state_machine_env(template, machines)
    service = LocalStepFunctions(machines, LocalRunner(invoke, s3_client()))
    reserve_port(options.sfn_port, "Step Functions", "--sfn-port").close()
    stack.step_functions = StepFunctionsEndpoint(service, HOST, options.sfn_port)
    stack.step_functions.start()
    os.environ["AWS_ENDPOINT_URL_SFN"] = stack.step_functions.url
    os.environ.update(wiring)
    stack.state_machine_arn = wiring.get("BATCH_STATE_MACHINE_ARN")
    stack.monitoring_map_arn = wiring.get("MONITORING_STATE_MACHINE_ARN")


def state_machine_env(template: Template, machines: Mapping[str, Any]) -> dict[str, str]:
    """Which served machine is which: ``BATCH_STATE_MACHINE_ARN`` (the CLI's) is the machine
    of the template's ``BatchStateMachineArn`` output; ``MONITORING_STATE_MACHINE_ARN`` is what
    the monitoring function's environment names, and must be a machine served here."""
    arns = {m.arn for m in machines.values()}
    env: dict[str, str] = {}
    output = ((template.data.get("Outputs") or {}).get("BatchStateMachineArn") or {}).get("Value")
    batch = machines.get(str(output.get("Ref"))) if isinstance(output, dict) else None
    if batch is not None:
        env["BATCH_STATE_MACHINE_ARN"] = batch.arn
    for fn in template.functions().values():
        arn = fn.environment.get("MONITORING_STATE_MACHINE_ARN")
        if not arn:
            continue
        if arn not in arns:
            raise ConfigurationError(
                f"template: {fn.logical_id}'s MONITORING_STATE_MACHINE_ARN {arn!r} names no "
                f"state machine of the template (served: {sorted(arns)})"
            )
        env["MONITORING_STATE_MACHINE_ARN"] = arn
    return env


def scheduled_event() -> dict[str, Any]:
    """The event an EventBridge schedule delivers."""
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "123456789012",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "region": REGION,
        "resources": ["arn:aws:events:us-east-1:123456789012:rule/treeserve-local-schedule"],
        "detail": {},
    }


def run(options: LocalOptions, out: TextIO = sys.stdout) -> int:
    """Run the local stack until SIGINT/SIGTERM; 0 after a clean stop."""
    api_socket = check_ports(options.port, options.moto_port)  # before anything starts
    try:
        with _sigterm_as_interrupt():
            stack, resources = start(options, out)
    except BaseException:
        api_socket.close()
        raise
    try:
        if stack.app is None:  # start() sets it or raises
            raise TreeserveError("the inference function's gateway was not started")
        server = make_server(stack.app, options.port, every_second=stack.flush_due_captures)
        _say(out, banner(stack, resources))
        server.run(sockets=[api_socket])
    finally:
        api_socket.close()
        _say(out, "treeserve local: stopping")
        stack.stop()
        _say(out, "treeserve local: stopped")
    return 0


def local_command(args: argparse.Namespace) -> int:
    """``treeserve local``: see the module docstring."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    # Powertools warns on every invocation that records no metric (an s3:TestEvent, say).
    warnings.filterwarnings("ignore", message="No application metrics to publish")
    return run(options_from_args(args))


# --- the template, the handlers, the CLI: the parts other modules own --------------------------


def _events_of_type(fn: FunctionDef, kind: str) -> bool:
    return any(e.get("Type") == kind for e in fn.events.values())


def _one(functions: list[FunctionDef], what: str) -> FunctionDef:
    if len(functions) != 1:
        names = ", ".join(f.logical_id for f in functions) or "none"
        raise ConfigurationError(f"template: expected one {what}, found {names}")
    return functions[0]


def _arn_name(arn: str) -> str:
    return arn.rsplit(":", 1)[-1]


def read_stack(template: Template) -> StackSpec:
    """The local stack's plan, read from template.yaml (intrinsics resolved locally).

    The refresh function is the one the bucket notifies (its S3 event), the inference function
    the one behind the API (an HttpApi/Api event), monitoring the one on a schedule.
    """
    functions = list(template.functions().values())
    notifications = template.bucket_notifications()
    if len(notifications) != 1:
        raise ConfigurationError(
            "template: expected one function with an S3 event on the model bucket, "
            f"found {len(notifications)}"
        )
    notification = notifications[0]
    by_id = {fn.logical_id: fn for fn in functions}
    refresh = by_id[notification.function]
    inference = _one(
        [f for f in functions if _events_of_type(f, "HttpApi") or _events_of_type(f, "Api")],
        "function behind the API (an HttpApi or Api event)",
    )
    scheduled = [f for f in functions if _events_of_type(f, "Schedule")]
    monitoring = _one(scheduled, "scheduled function") if scheduled else None

    buckets = template.resources_of_type("AWS::S3::Bucket")
    bucket = template.bucket_name()
    if notification.bucket != bucket:
        raise ConfigurationError(
            f"template: {refresh.logical_id} is notified by bucket {notification.bucket!r}, "
            f"not by the model bucket {bucket!r}"
        )
    versioned = any(
        (props.get("VersioningConfiguration") or {}).get("Status") == "Enabled"
        for props in buckets.values()
    )
    on_failure = (
        ((refresh.properties.get("EventInvokeConfig") or {}).get("DestinationConfig") or {})
        .get("OnFailure", {})
        .get("Destination")
    )
    queues = sorted(template.queues().values())
    failure_queue = _arn_name(str(on_failure)) if on_failure else None
    return StackSpec(
        bucket=bucket,
        versioned=versioned,
        incoming_prefix=notification.prefix,
        incoming_events=list(notification.events),
        topics=sorted(_arn_name(arn) for arn in template.topics().values()),
        queues=queues,
        refresh_failure_queue=failure_queue if failure_queue in queues else None,
        inference=inference,
        refresh=refresh,
        monitoring=monitoring,
    )


def load_handler(fn: FunctionDef, env: Mapping[str, str]) -> Callable[..., Any]:
    """Import ``fn``'s handler from its own folder (:mod:`treeserve_cli.invoke`), with the function's
    environment set while it imports: module-level objects (Powertools' service name, settings)
    see what they would in their own Lambda execution environment."""
    with environment(runtime_environment(fn, env)):
        return import_handler(fn.code_uri, fn.handler)


def publish_demo(package: Path, spec: StackSpec, model_name: str) -> int:
    """``treeserve publish PACKAGE --wait``, as a user would run it; the version promoted."""
    from treeserve.registry.model_registry import ModelRegistry  # noqa: PLC0415
    from treeserve.registry.store import S3RegistryStore  # noqa: PLC0415
    from treeserve_cli.cli import build_parser  # noqa: PLC0415
    from treeserve_cli.commands import publish  # noqa: PLC0415

    args = build_parser().parse_args(
        [
            "publish",
            str(package),
            "--bucket",
            spec.bucket,
            "--name",
            model_name,
            "--wait",
            "--timeout",
            f"{DEMO_TIMEOUT_SECONDS:g}",
        ]
    )
    code = publish(args)
    pointer = ModelRegistry(S3RegistryStore(spec.bucket), model_name).current()
    if code != 0 or pointer is None:
        raise TreeserveError(
            f"the demo model was not promoted (publish exit code {code}): see the refresh "
            "function's log above"
        )
    return pointer.version
