"""Retries by the libraries' own settings, and the one message a user needs when they run out.

A tracking server that restarts, or an object store that throttles, should cost a pipeline a few
seconds, not a run; a server that is gone should stop it quickly with a message that says what to
do. MLflow's HTTP client already retries connection errors, timeouts, 408/429 and 5xx with
exponential backoff, and botocore does the same for S3. :func:`retry_settings` sets both from
``register.retries`` (attempts in all) and ``register.retry_backoff_s`` for the duration of a
block, unless the user set them (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``, ``AWS_MAX_ATTEMPTS``, ``AWS_RETRY_MODE``).

What remains here is the translation: :meth:`Server.call` turns the failure MLflow raises once its
retries are spent into :class:`RegistryUnavailableError`, naming the URI, the step that failed and
the way out, and a refusal into :class:`RegistryError`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from mlflow.exceptions import MlflowException

from imtext.config import RegisterConfig
from imtext.errors import ImtextError

T = TypeVar("T")

#: MLflow error codes of a server that did not answer (a refused connection or an exhausted retry
#: budget reaches the caller as INTERNAL_ERROR without an HTTP status).
UNAVAILABLE_MLFLOW_CODES = frozenset(
    {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
)

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


def retry_environment(cfg: RegisterConfig) -> dict[str, str]:
    """MLflow's and botocore's retry settings for ``cfg.retries`` attempts in all.

    urllib3 (under MLflow) sleeps ``backoff * 2**(n - 1)`` before retry ``n``; MLflow takes whole
    seconds there, so the backoff is rounded up. botocore's ``standard`` mode retries throttling,
    5xx and connection errors with jittered backoff.
    """
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(cfg.retries - 1),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(math.ceil(cfg.retry_backoff_s)),
        "AWS_MAX_ATTEMPTS": str(cfg.retries),
        "AWS_RETRY_MODE": "standard",
    }


@contextmanager
def retry_settings(cfg: RegisterConfig) -> Iterator[None]:
    """Within the block, :func:`retry_environment` of ``cfg`` is in force, except for each
    variable the user set; afterwards the environment is as it was."""
    added = [key for key in retry_environment(cfg) if key not in os.environ]
    os.environ.update({key: retry_environment(cfg)[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def attempts_in_force() -> str:
    """How many attempts MLflow makes per request now, for messages."""
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    return "MLflow's default retries" if retries is None else f"{int(retries) + 1} attempt(s)"


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the server did not answer (as opposed to refusing the request)."""
    if isinstance(exc, MlflowException):
        return exc.error_code in UNAVAILABLE_MLFLOW_CODES
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    import requests

    return isinstance(exc, requests.ConnectionError | requests.Timeout)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``exc`` as one short line (urllib3's messages span lines and run to a kilobyte)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def translated(what: str, uri: str, hint: str = DEFAULT_HINT) -> Iterator[None]:
    """Errors of MLflow, requests and botocore inside the block as :class:`RegistryError`
    (refused) or :class:`RegistryUnavailableError` (no answer), each naming ``what`` and
    ``uri``."""
    try:
        yield
    except ImtextError:
        raise
    except Exception as exc:
        if is_unavailable(exc):
            raise RegistryUnavailableError(
                f"{what}: MLflow at {uri} did not answer ({attempts_in_force()}), last with: "
                f"{one_line(exc)}; {hint}"
            ) from exc
        if isinstance(exc, MlflowException):
            raise RegistryError(f"{what}: MLflow at {uri} refused: {one_line(exc)}") from exc
        if _is_s3_error(exc):
            raise RegistryError(
                f"{what}: the artifact store of MLflow at {uri} refused: {one_line(exc)}; "
                "check the bucket and the AWS credentials (AWS_*, MLFLOW_S3_ENDPOINT_URL)"
            ) from exc
        raise


@dataclass(frozen=True)
class Server:
    """One MLflow client and the message its failures end in.

    ``server.call("create the run", client.create_run, experiment_id)`` runs the call (MLflow
    retries it under :func:`retry_settings`); ``missing_ok=True`` returns ``None`` when MLflow
    says the thing does not exist.
    """

    uri: str
    client: Any  # mlflow.MlflowClient; Any keeps this module's import of mlflow light
    hint: str = DEFAULT_HINT
    log: Callable[[str], None] = no_log

    def call(
        self, what: str, fn: Callable[..., T], *args: Any, missing_ok: bool = False, **kwargs: Any
    ) -> T | None:
        try:
            with translated(what, self.uri, self.hint):
                return fn(*args, **kwargs)
        except RegistryError as exc:
            cause = exc.__cause__
            if (
                missing_ok
                and isinstance(cause, MlflowException)
                and cause.error_code == "RESOURCE_DOES_NOT_EXIST"
            ):
                return None
            raise


def _is_s3_error(exc: BaseException) -> bool:
    """An object-store error a user fixes by configuration (no bucket, no credentials)."""
    try:
        from botocore import exceptions as boto
    except ImportError:
        return False
    return isinstance(exc, boto.BotoCoreError | boto.ClientError)
