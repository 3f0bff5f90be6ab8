"""The promotion lock: one promoter at a time per (registered model, alias), held in the registry.

The lock is a registered model named :func:`lock_name`, created with two tags, its owner (a token
unique to one ``promote`` call) and its expiry (seconds since the epoch, on the holder's clock),
and deleted when the promotion ends. Creating a registered model is the one test-and-set MLflow's
API offers: its name is a unique key in every backend store (SQLite, PostgreSQL), and the REST
server answers ``RESOURCE_ALREADY_EXISTS`` to the second creator. Tags are plain upserts, so a
lock made of tags alone would let two promoters each read back their own token.

A holder that dies leaves the lock until its expiry; the next promoter then deletes it (after
reading it again, so that only the expired holder's lock is removed) and takes its own. Two
promoters breaking the same expired lock in the same instant could still both proceed: a window of
one request, open only after a crash.
"""

from __future__ import annotations

import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from mlflow.exceptions import MlflowException

from imtext.config import RegisterConfig
from imtext.logs import MessageLog
from imtext.registry.retry import RegistryError, Server

#: Seconds a lock is valid. A promotion takes a dozen requests (well under a second on a healthy
#: server); the lease only bounds how long a killed promoter blocks the next one, and it must
#: exceed the clock skew between the machines that promote.
LEASE_S = 120.0
#: Seconds ``promote`` waits for a lock held by another promoter before it gives up.
WAIT_S = 300.0
#: A holder with less than this left of its lease does not start a change.
MARGIN_S = 10.0
OWNER_TAG = "imtext.lock.owner"
EXPIRES_TAG = "imtext.lock.expires"
#: Longest pause between two attempts at a held lock.
MAX_POLL_S = 0.25


@dataclass(frozen=True)
class Lease:
    """A lock this process holds: the lock model's name, our token, and when the lease ends."""

    name: str
    owner: str
    expires: float

    def seconds_left(self, now: float | None = None) -> float:
        return self.expires - (time.time() if now is None else now)


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its tags say (``expires`` is 0 when the tag is missing or bad)."""

    owner: str
    expires: float


def lock_name(cfg: RegisterConfig) -> str:
    """The registered model that serves as the lock of alias ``cfg.alias`` of ``cfg.model_name``."""
    return f"{cfg.model_name}.promotion-lock.{cfg.alias}"


def new_owner() -> str:
    """A token naming this holder to a person (host, process) and unique to one acquisition."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


@contextmanager
def promotion_lock(
    server: Server,
    cfg: RegisterConfig,
    wait_s: float = WAIT_S,
    log: MessageLog | None = None,
    lease_s: float = LEASE_S,
) -> Iterator[Lease]:
    """Hold the promotion lock of ``cfg``'s alias for the block; released on the way out."""
    lease = acquire(server, lock_name(cfg), cfg.alias, wait_s, lease_s, log or server.log)
    try:
        yield lease
    finally:
        release(server, lease)


def acquire(
    server: Server,
    name: str,
    alias: str,
    wait_s: float,
    lease_s: float,
    log: MessageLog,
) -> Lease:
    """Create lock model ``name``, waiting up to ``wait_s`` seconds while another holder has it."""
    owner = new_owner()
    deadline = time.monotonic() + wait_s
    pause, said = 0.02, False
    while True:
        expires = time.time() + lease_s
        if create_lock(server, name, alias, owner, expires):
            return Lease(name, owner, expires)
        holder = read_holder(server, name)
        if holder is None:  # released between our two requests: try again at once
            continue
        if holder.owner == owner:
            # Our create went through but its answer was lost and the retry saw it existing.
            return Lease(name, owner, holder.expires)
        if holder.expires <= time.time():
            log(f"promotion lock {name!r} of {holder.owner} expired at {when(holder.expires)}")
            break_expired(server, name, holder)
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            raise RegistryError(
                f"the promotion lock of alias {alias!r} (registered model {name!r} at "
                f"{server.uri}) is held by {holder.owner} until {when(holder.expires)}: another "
                f"promotion is running; run this one again when it ends. If that process is gone, "
                f"the lock expires by itself, or delete registered model {name!r}"
            )
        if not said:
            log(f"waiting for the promotion lock {name!r}, held by {holder.owner}")
            said = True
        # Jitter keeps waiting promoters from polling the server in step.
        time.sleep(min(left, pause * random.uniform(0.5, 1.5)))
        pause = min(pause * 2, MAX_POLL_S)


def create_lock(server: Server, name: str, alias: str, owner: str, expires: float) -> bool:
    """Whether this call created lock model ``name`` (False: it exists already)."""
    try:
        server.call(
            f"take the promotion lock {name!r}",
            server.client.create_registered_model,
            name,
            tags={OWNER_TAG: owner, EXPIRES_TAG: repr(expires)},
            description=(
                f"imtext promotion lock of alias {alias!r}, held by {owner} until "
                f"{when(expires)}; deleted when that promotion ends, safe to delete after then"
            ),
        )
    except RegistryError as exc:
        # A SQL store that finds the name taken reads the model back to word its error; when the
        # holder deletes it in between, the answer is "not found" instead. Either way the lock
        # existed a moment ago: the caller reads the holder and tries again.
        if error_code(exc) in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
            return False
        raise
    return True


def error_code(exc: RegistryError) -> str | None:
    """MLflow's error code of the refusal behind ``exc``, if MLflow raised it."""
    cause = exc.__cause__
    return cause.error_code if isinstance(cause, MlflowException) else None


def read_holder(server: Server, name: str) -> Holder | None:
    """The holder of lock model ``name``, or ``None`` when there is no such lock."""
    model = server.call(
        f"read the promotion lock {name!r}",
        server.client.get_registered_model,
        name,
        missing_ok=True,
    )
    if model is None:
        return None
    tags = model.tags or {}
    try:
        expires = float(tags.get(EXPIRES_TAG, "0"))
    except ValueError:
        expires = 0.0  # a lock nobody can date is treated as expired
    return Holder(tags.get(OWNER_TAG, "an unknown holder"), expires)


def break_expired(server: Server, name: str, seen: Holder) -> None:
    """Delete lock ``name`` if it is still the expired lock ``seen`` (not a new holder's)."""
    now = read_holder(server, name)
    if now is None or now.owner != seen.owner:
        return
    server.call(
        f"remove the expired promotion lock {name!r}",
        server.client.delete_registered_model,
        name,
        missing_ok=True,
    )


def release(server: Server, lease: Lease) -> None:
    """Delete our lock model; one that is no longer ours (it expired and was taken) stays."""
    holder = read_holder(server, lease.name)
    if holder is None or holder.owner != lease.owner:
        server.log(f"promotion lock {lease.name!r} was no longer held by {lease.owner}")
        return
    server.call(
        f"release the promotion lock {lease.name!r}",
        server.client.delete_registered_model,
        lease.name,
        missing_ok=True,
    )


def check_still_held(server: Server, lease: Lease, margin_s: float = MARGIN_S) -> None:
    """Raise :class:`RegistryError` unless ``lease`` is ours with ``margin_s`` seconds to spare."""
    holder = read_holder(server, lease.name)
    if holder is None or holder.owner != lease.owner:
        raise RegistryError(
            f"lost the promotion lock {lease.name!r} at {server.uri} (now held by "
            f"{holder.owner if holder else 'nobody'}): this promotion outlived its lease of "
            f"{LEASE_S:g}s; check the alias and run `imtext promote` again"
        )
    if lease.seconds_left() < margin_s:
        raise RegistryError(
            f"the promotion lock {lease.name!r} at {server.uri} expires in "
            f"{lease.seconds_left():.0f}s: too little to move the alias safely (the server is "
            "slow); nothing was moved, run `imtext promote` again"
        )


def when(epoch_s: float) -> str:
    """``epoch_s`` as an ISO time a person reads in a message."""
    try:
        return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"{epoch_s!r} (not a time)"
