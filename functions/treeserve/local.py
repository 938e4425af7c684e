"""``treeserve local``: the whole stack on one machine, no AWS account and no Docker.

What runs, all in this process, all on loopback:

- a moto server (``ThreadedMotoServer``) as the embedded AWS; this process, its functions and
  the user's CLI reach it through the standard ``AWS_ENDPOINT_URL``;
- the resources template.yaml declares (bucket, SNS topics, SQS queues), created from the
  template with its intrinsics resolved locally (:mod:`treeserve.template`);
- the bucket's real S3 event notifications for the refresh function's prefix, sent by moto to an
  SQS queue (the local stand-in for the Lambda trigger), long-polled by a thread that invokes the
  refresh handler with the SQS event, through the template's handler wiring;
- a demo model (:mod:`treeserve.demo`) published the way a user would: a package uploaded to
  ``incoming/``, validated and promoted by the refresh handler;
- the inference function's FastAPI app (the same object its Lambda handler wraps) under uvicorn;
- the monitoring handler on a timer (and on demand: ``treeserve monitor`` with the printed env).

Ctrl-C (SIGINT) or SIGTERM stops everything and exits 0.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from moto.server import ThreadedMotoServer

from treeserve.aws import reset_clients, sqs_client
from treeserve.errors import ConfigurationError

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

logger = logging.getLogger("treeserve.local")

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
        reserve_port(moto_port, "embedded AWS (moto)", "--moto-port").close()
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


@dataclass
class RunningStack:
    """What is running, for the banner, the shutdown and the tests."""

    options: LocalOptions
    moto: Any = None
    poller: NotificationPoller | None = None
    timer: Every | None = None
    server: Any = None  # uvicorn.Server
    bucket: str = ""
    model_name: str = "default"
    demo_dir: Path | None = None
    demo_rows: list[list[float]] = field(default_factory=list)
    demo_auc: float | None = None
    served_version: int | None = None
    lines: list[str] = field(default_factory=list)

    def stop(self) -> None:
        """Stop in the reverse order of start; every step runs even if an earlier one failed."""
        for step in (self._stop_timer, self._stop_poller, self._stop_moto, self._remove_demo):
            try:
                step()
            except Exception:
                logger.exception("stopping the local stack: %s failed", step.__name__)

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.stop()

    def _stop_poller(self) -> None:
        if self.poller is not None:
            self.poller.stop()

    def _stop_moto(self) -> None:
        if self.moto is not None:
            self.moto.stop()

    def _remove_demo(self) -> None:
        if self.demo_dir is not None:
            shutil.rmtree(self.demo_dir, ignore_errors=True)


def start_moto(port: int) -> Any:
    """The embedded AWS: moto's threaded server on loopback (its request log silenced)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address=HOST, port=port, verbose=False)
    server.start()
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
