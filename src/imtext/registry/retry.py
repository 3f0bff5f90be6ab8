"""Bounded retries around every call to the tracking server, the model registry or the object store.

A tracking server that restarts, or an object store that throttles, should cost a pipeline a few
seconds, not a run; a server that is gone should stop it quickly with a message that says what to do.
:func:`call_with_retries` gives a call ``attempts`` tries with exponential backoff, retries only
failures that a later attempt can fix (connection errors, timeouts, 5xx-like MLflow errors), and
turns the final failure into :class:`RegistryUnavailableError`, which names the URI, the step that
failed and the way out.

MLflow's HTTP client retries on its own as well (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7 with
exponential backoff). :func:`bounded_http_retries` turns that off while imtext talks to the server
unless the user set it, so that the total wait is bounded by ``register.retries`` and
``register.retry_backoff_s`` alone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from mlflow.exceptions import MlflowException

from imtext.errors import ImtextError

T = TypeVar("T")

#: MLflow error codes a later attempt can succeed on (a REST failure without a code, e.g. a refused
#: connection, is reported by MLflow as INTERNAL_ERROR).
TRANSIENT_MLFLOW_CODES = frozenset(
    {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
)

#: Seconds of backoff are doubled per attempt but never exceed this.
MAX_BACKOFF_S = 30.0

DEFAULT_HINT = (
    "check that the MLflow tracking server is running and reachable (locally: start it with "
    "mlflow/start-local.sh, see mlflow/README.md), or point MLFLOW_TRACKING_URI or "
    "register.tracking_uri at one that is"
)


class RegistryError(ImtextError):
    """The tracking server or model registry refused a request (a missing model, a bad value)."""


class RegistryUnavailableError(RegistryError):
    """The tracking server or object store did not answer, after every retry."""


def no_log(message: str) -> None:
    """The default ``log`` callable: say nothing."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure that retrying the same call can fix."""
    if isinstance(exc, MlflowException):
        return exc.error_code in TRANSIENT_MLFLOW_CODES
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    return _is_transient_http_error(exc) or _is_transient_s3_error(exc)


def _is_transient_http_error(exc: BaseException) -> bool:
    import requests

    return isinstance(exc, requests.ConnectionError | requests.Timeout)


def _is_transient_s3_error(exc: BaseException) -> bool:
    # botocore is present whenever artifacts go to S3 directly; without it nothing raises its errors.
    try:
        from botocore import exceptions as boto
    except ImportError:
        return False
    if isinstance(exc, boto.ConnectionError | boto.HTTPClientError):
        return True
    if isinstance(exc, boto.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or exc.response.get("Error", {}).get("Code") == "SlowDown"
    return False


def backoff_delays(attempts: int, backoff_s: float) -> list[float]:
    """Seconds to wait before each retry: ``backoff_s``, doubled each time, capped."""
    return [min(backoff_s * 2**i, MAX_BACKOFF_S) for i in range(attempts - 1)]


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``exc`` as one short line (urllib3's messages span lines and run to a kilobyte)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def call_with_retries(
    call: Callable[[], T],
    *,
    what: str,
    uri: str,
    attempts: int,
    backoff_s: float,
    hint: str = DEFAULT_HINT,
    log: Callable[[str], None] = no_log,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``call()``, retried on transient failures up to ``attempts`` times in all.

    A non-transient failure (an MLflow "does not exist", a bad value) is raised at once, unchanged,
    so callers can react to it. When every attempt fails, raises :class:`RegistryUnavailableError`
    naming ``what`` failed at ``uri`` and ``hint`` (what the user can do).
    """
    delays = backoff_delays(attempts, backoff_s)
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == attempts:
                raise RegistryUnavailableError(
                    f"{what}: MLflow at {uri} failed {attempts} time(s), last with: "
                    f"{one_line(exc)}; {hint}"
                ) from exc
            delay = delays[attempt - 1]
            log(
                f"{what}: attempt {attempt}/{attempts} failed ({one_line(exc, 120)}); "
                f"retrying in {delay:g}s"
            )
            sleep(delay)
    raise AssertionError("unreachable: attempts >= 1")  # RegisterConfig guarantees retries >= 1


@contextmanager
def bounded_http_retries() -> Iterator[None]:
    """Within the block, MLflow's HTTP client does not retry unless the user asked it to.

    Our own retries then bound the wait; MLflow's default of 7 retries with exponential backoff
    under each of ours would turn an unreachable server into minutes of silence.
    """
    key = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
    if key in os.environ:
        yield
        return
    os.environ[key] = "0"
    try:
        yield
    finally:
        os.environ.pop(key, None)


@dataclass(frozen=True)
class Server:
    """One MLflow client and the retry policy its calls go through.

    ``server.call("create the run", client.create_run, experiment_id)`` runs the call with retries;
    ``missing_ok=True`` returns ``None`` when MLflow says the thing does not exist.
    """

    uri: str
    client: Any  # mlflow.MlflowClient; Any keeps this module's import of mlflow light
    attempts: int
    backoff_s: float
    hint: str = DEFAULT_HINT
    log: Callable[[str], None] = no_log

    def call(
        self, what: str, fn: Callable[..., T], *args: Any, missing_ok: bool = False, **kwargs: Any
    ) -> T | None:
        try:
            return call_with_retries(
                lambda: fn(*args, **kwargs),
                what=what,
                uri=self.uri,
                attempts=self.attempts,
                backoff_s=self.backoff_s,
                hint=self.hint,
                log=self.log,
            )
        except MlflowException as exc:
            if missing_ok and exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise RegistryError(f"{what}: MLflow at {self.uri} refused: {one_line(exc)}") from exc
        except Exception as exc:
            if not _is_s3_refusal(exc):
                raise
            raise RegistryError(
                f"{what}: the artifact store of MLflow at {self.uri} refused: {one_line(exc)}; "
                "check the bucket and the AWS credentials (AWS_*, MLFLOW_S3_ENDPOINT_URL)"
            ) from exc


def _is_s3_refusal(exc: BaseException) -> bool:
    """An object-store error a user fixes by configuration (no bucket, no credentials)."""
    try:
        from botocore import exceptions as boto
    except ImportError:
        return False
    return isinstance(exc, boto.BotoCoreError | boto.ClientError)
