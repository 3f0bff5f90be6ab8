"""The serving alias: ``promote`` moves it behind a metric gate, ``load_champion`` loads what it names.

A candidate version takes the alias (``champion``) only when its gate metric (evaluate's ``rsum``
by default, higher is better) beats the current champion's by more than ``gate_min_delta``; the
first version of a model always does. Every decision, refusals included, is written on the candidate
version as ``promotion.*`` tags, so the registry itself shows why each version is or is not serving.
A person can override a refusal with a written reason (``force_reason``), which is recorded too.

One refusal cannot be forced: a candidate that scores differently from the champion (version tag
``imtext.similarity``: ``dot`` for embedding models, ``network`` for the similarity network, which
answers pairs only) would break every client of the alias, so it needs a registered model of its own.

Concurrent promotions take turns: reading the champion, judging and moving the alias happen under
a promotion lock held in the registry itself (:mod:`imtext.registry.lock`), so every promoter that
shares the tracking server or the SQLite file sees it. The second promoter waits, then judges its
candidate against the champion the first one left. After moving the alias, ``promote`` reads it
back and checks that the lock is still its own.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imtext import __version__
from imtext.config import RegisterConfig
from imtext.errors import ConfigError, ImtextError
from imtext.logs import MessageLog
from imtext.registry.lock import WAIT_S, Lease, check_still_held, promotion_lock
from imtext.registry.provenance import TAG_IMTEXT_VERSION, TAG_MODEL_SHA256, TAG_SIMILARITY
from imtext.registry.retry import RegistryError, Server, no_log, retry_settings
from imtext.registry.runs import connect, resolve_tracking_uri

#: MLflow's limit on a model-version tag value is larger; a reason longer than this is an essay.
MAX_REASON_CHARS = 2000


@dataclass(frozen=True)
class PromotionDecision:
    """What ``promote`` decided, and the evidence it decided on."""

    promoted: bool
    version: str
    #: The version that held the alias before (``None`` when there was none).
    previous_champion: str | None
    candidate_metric: float | None
    champion_metric: float | None
    reason: str
    #: The candidate scores pairs differently from the champion (no force can promote it).
    incompatible: bool = False


def promote(
    cfg: RegisterConfig,
    version: str | int,
    *,
    tracking_uri: str | None = None,
    force_reason: str | None = None,
    log: MessageLog = no_log,
    lock_wait_s: float = WAIT_S,
) -> PromotionDecision:
    """Point alias ``cfg.alias`` of ``cfg.model_name`` at ``version`` if it passes the gate.

    Passing means: no version holds the alias yet, or ``version``'s ``cfg.gate_metric`` exceeds
    the champion's by more than ``cfg.gate_min_delta``. A refusal is a normal outcome
    (``promoted=False`` with a reason naming both values), not an error. ``force_reason`` promotes
    regardless and is recorded; an empty one is a :class:`ConfigError`. A version (candidate or
    champion) without the gate metric is an :class:`ImtextError`, unless forced.

    Runs under the promotion lock (module docstring), waiting up to ``lock_wait_s`` seconds for
    another promoter of the same alias; a :class:`RegistryError` says who holds it when that runs
    out.
    """
    if force_reason is not None and not force_reason.strip():
        raise ConfigError("promote: forcing a promotion needs a reason; pass a non-empty reason")
    version = str(version)
    server = connect(resolve_tracking_uri(cfg, tracking_uri), cfg, log)
    with retry_settings(cfg), promotion_lock(server, cfg, lock_wait_s, log) as lease:
        decision = judge_and_move(server, cfg, version, force_reason, lease)
    log(f"{cfg.model_name} version {version}: {decision.reason}")
    return decision


def judge_and_move(
    server: Server, cfg: RegisterConfig, version: str, force_reason: str | None, lease: Lease
) -> PromotionDecision:
    """The body of :func:`promote`, run while holding ``lease``."""
    forced = force_reason is not None
    decision = judge(server, cfg, version, forced=forced)
    if decision.previous_champion == version:
        return decision
    if forced and decision.incompatible:
        raise ConfigError(f"promote: cannot force version {version}: {decision.reason}")
    if forced:
        decision = force(decision, force_reason.strip())
    record_decision(server, cfg, decision, force_reason)
    if decision.promoted:
        check_still_held(server, lease)
        server.call(
            f"point alias {cfg.alias!r} at version {version}",
            server.client.set_registered_model_alias,
            cfg.model_name,
            cfg.alias,
            version,
        )
        verify_alias(server, cfg, version, lease)
    return decision


def verify_alias(server: Server, cfg: RegisterConfig, version: str, lease: Lease) -> None:
    """Read the alias back: it names ``version`` and the lock is still ours, or a promoter that
    ignores the lock (an older imtext, the MLflow UI) moved it meanwhile and a person must look."""
    champion = champion_version(server, cfg.model_name, cfg.alias)
    found = None if champion is None else str(champion.version)
    if found != version:
        raise RegistryError(
            f"alias {cfg.alias!r} of {cfg.model_name!r} at {server.uri} names version {found} "
            f"right after it was pointed at version {version}: something moved it without the "
            f"promotion lock {lease.name!r} (an older imtext, the MLflow UI); check the alias and "
            "run `imtext promote` again for the versions involved"
        )
    check_still_held(server, lease, margin_s=0.0)


def preview_promotion(
    cfg: RegisterConfig,
    version: str | int,
    *,
    tracking_uri: str | None = None,
    log: MessageLog = no_log,
) -> PromotionDecision:
    """What :func:`promote` would decide for ``version`` against the champion of this moment,
    with nothing recorded or moved (a pipeline uses it to skip its promote step)."""
    server = connect(resolve_tracking_uri(cfg, tracking_uri), cfg, log)
    with retry_settings(cfg):
        return judge(server, cfg, str(version), forced=False)


def judge(server: Server, cfg: RegisterConfig, version: str, *, forced: bool) -> PromotionDecision:
    """The gate's decision for ``version``, read from the registry; writes nothing.

    A version that already holds the alias comes back promoted, with itself as the previous
    champion. ``forced`` tolerates versions without the gate metric (their value is ``None``).
    """
    candidate = model_version(server, cfg.model_name, version)
    champion = champion_version(server, cfg.model_name, cfg.alias)
    candidate_metric = gate_metric(server, candidate, cfg.gate_metric, required=not forced)
    if champion is not None and str(champion.version) == version:
        reason = f"version {version} already holds alias {cfg.alias!r}; nothing to do"
        return PromotionDecision(True, version, version, candidate_metric, candidate_metric, reason)
    champion_metric = (
        gate_metric(server, champion, cfg.gate_metric, required=not forced)
        if champion is not None
        else None
    )
    previous = str(champion.version) if champion is not None else None
    if champion is not None and version_similarity(candidate) != version_similarity(champion):
        return incompatible(cfg, candidate, champion, candidate_metric, champion_metric)
    return decide(cfg, version, previous, candidate_metric, champion_metric)


def version_similarity(version: Any) -> str:
    """How a version scores a pair (tag ``imtext.similarity``); versions registered before the
    tag existed are embedding models (``dot``)."""
    return (version.tags or {}).get(TAG_SIMILARITY, "dot")


def incompatible(
    cfg: RegisterConfig,
    candidate: Any,
    champion: Any,
    candidate_metric: float | None,
    champion_metric: float | None,
) -> PromotionDecision:
    """The refusal of a candidate whose scoring differs from the champion's."""
    answers = {"dot": "embeddings (dot-product scores)", "network": "pair scores only"}
    new, old = version_similarity(candidate), version_similarity(champion)
    reason = (
        f"version {candidate.version} scores with {new!r} ({answers.get(new, new)}) but champion "
        f"version {champion.version} with {old!r} ({answers.get(old, old)}): clients of alias "
        f"{cfg.alias!r} would break; register it under a model name of its own "
        f"(register.model_name, e.g. {cfg.model_name}-{new}); alias {cfg.alias!r} stays on "
        f"version {champion.version}"
    )
    return PromotionDecision(
        False, str(candidate.version), str(champion.version), candidate_metric, champion_metric,
        reason, incompatible=True,
    )  # fmt: skip


def decide(
    cfg: RegisterConfig,
    version: str,
    champion: str | None,
    candidate_metric: float | None,
    champion_metric: float | None,
) -> PromotionDecision:
    """The gate itself: promote when there is no champion, or the candidate is better by more than
    ``gate_min_delta``. NaN never passes (every comparison with it is false)."""
    metric = cfg.gate_metric
    if champion is None:
        reason = (
            f"no version holds alias {cfg.alias!r} yet; version {version} "
            f"({metric} {_fmt(candidate_metric)}) becomes the first"
        )
        return PromotionDecision(True, version, None, candidate_metric, None, reason)
    if candidate_metric is None or champion_metric is None:
        # Only reachable when forced: the caller replaces the decision.
        reason = f"{metric} missing on version {version} or on champion version {champion}"
        return PromotionDecision(
            False, version, champion, candidate_metric, champion_metric, reason
        )
    delta = candidate_metric - champion_metric
    if delta > cfg.gate_min_delta:
        reason = (
            f"{metric} {_fmt(candidate_metric)} of version {version} beats "
            f"{_fmt(champion_metric)} of champion version {champion} by {_fmt(delta)} "
            f"(more than the minimum {cfg.gate_min_delta:g})"
        )
        return PromotionDecision(True, version, champion, candidate_metric, champion_metric, reason)
    reason = (
        f"{metric} {_fmt(candidate_metric)} of version {version} does not beat "
        f"{_fmt(champion_metric)} of champion version {champion} by more than "
        f"{cfg.gate_min_delta:g} (difference {_fmt(delta)}); alias {cfg.alias!r} stays on "
        f"version {champion}"
    )
    return PromotionDecision(False, version, champion, candidate_metric, champion_metric, reason)


def force(decision: PromotionDecision, reason: str) -> PromotionDecision:
    """``decision`` overridden to a promotion, keeping the gate's verdict in the reason."""
    return PromotionDecision(
        True,
        decision.version,
        decision.previous_champion,
        decision.candidate_metric,
        decision.champion_metric,
        f"forced ({reason}); the gate said: {decision.reason}",
    )


def record_decision(
    server: Server, cfg: RegisterConfig, decision: PromotionDecision, force_reason: str | None
) -> None:
    """The evidence, as tags on the candidate version (one request per tag: MLflow has no batch)."""
    metric = cfg.gate_metric
    if force_reason is not None:
        verdict = "forced"
    else:
        verdict = "promoted" if decision.promoted else "refused"
    tags = {
        "promotion.decision": verdict,
        "promotion.alias": cfg.alias,
        "promotion.previous_champion": decision.previous_champion or "none",
        f"promotion.candidate_{metric}": _tag_number(decision.candidate_metric),
        f"promotion.champion_{metric}": _tag_number(decision.champion_metric),
        "promotion.min_delta": repr(cfg.gate_min_delta),
        "promotion.time": datetime.now(UTC).isoformat(timespec="seconds"),
        "promotion.reason": decision.reason[:MAX_REASON_CHARS],
    }
    if force_reason is not None:
        tags["promotion.forced_reason"] = force_reason.strip()[:MAX_REASON_CHARS]
    for key, value in tags.items():
        server.call(
            f"tag version {decision.version} with {key}",
            server.client.set_model_version_tag,
            cfg.model_name,
            decision.version,
            key,
            value,
        )


def model_version(server: Server, name: str, version: str) -> Any:
    found = server.call(
        f"look up version {version} of {name!r}",
        server.client.get_model_version,
        name,
        version,
        missing_ok=True,
    )
    if found is None:
        raise RegistryError(
            f"model {name!r} has no version {version} at {server.uri}; list the versions in the "
            "MLflow UI or register one with `imtext register`"
        )
    return found


def champion_version(server: Server, name: str, alias: str) -> Any | None:
    """The version holding ``alias``, or ``None`` when no version does."""
    model = server.call(
        f"look up registered model {name!r}",
        server.client.get_registered_model,
        name,
        missing_ok=True,
    )
    if model is None:
        raise RegistryError(
            f"no registered model {name!r} at {server.uri}; register a version with "
            "`imtext register` first"
        )
    aliases = getattr(model, "aliases", None) or {}
    if alias not in aliases:
        return None
    return model_version(server, name, str(aliases[alias]))


def gate_metric(server: Server, version: Any, metric: str, *, required: bool) -> float | None:
    """``metric`` as logged on the run that produced ``version`` (``None`` if absent and not
    ``required``)."""
    run = None
    if version.run_id:
        run = server.call(
            f"read the run of version {version.version}",
            server.client.get_run,
            version.run_id,
            missing_ok=True,
        )
    value = run.data.metrics.get(metric) if run is not None else None
    if value is None and required:
        source = f"its run {version.run_id}" if version.run_id else "it has no run"
        raise ImtextError(
            f"version {version.version} of {version.name!r} has no metric {metric!r} ({source}); "
            "register it from an evaluate output that has it, set register.gate_metric to a "
            "metric both versions have, or force the promotion with a reason"
        )
    return value


def load_champion(
    model_name: str,
    alias: str = "champion",
    tracking_uri: str | None = None,
    *,
    cfg: RegisterConfig | None = None,
    dst_path: Path | None = None,
) -> Any:
    """The pyfunc model that ``models:/<model_name>@<alias>`` names, ready to ``predict``.

    ``cfg`` supplies the retry policy and the default tracking URI (defaults: 4 attempts from 1 s);
    the model's files are downloaded to ``dst_path`` (a new temporary directory by default).
    See :mod:`imtext.registry.pyfunc` for the input and output of ``predict``.

    No code from the artifact store runs: the downloaded files must hash to the version's
    ``imtext.model_sha256`` tag, and the model is built from the installed imtext, which must be
    the version's ``imtext.version`` (:func:`imtext.registry.pyfunc.load_verified`). A version
    that fails either check is a :class:`RegistryError` saying what to do.
    """
    cfg = cfg or _default_cfg(model_name, alias)
    uri = resolve_tracking_uri(cfg, tracking_uri)
    server = connect(uri, cfg, no_log)
    with retry_settings(cfg):
        champion = _alias_holder(server, model_name, alias)
        return _download_verified(server, champion, dst_path)


def alias_version(
    model_name: str,
    alias: str = "champion",
    tracking_uri: str | None = None,
    *,
    cfg: RegisterConfig | None = None,
) -> str:
    """The number of the version ``models:/<model_name>@<alias>`` names now (one registry read:
    what a server polls to notice that the alias moved); a :class:`RegistryError` when no version
    holds the alias."""
    cfg = cfg or _default_cfg(model_name, alias)
    server = connect(resolve_tracking_uri(cfg, tracking_uri), cfg, no_log)
    with retry_settings(cfg):
        return str(_alias_holder(server, model_name, alias).version)


def load_model_version(
    model_name: str,
    version: str | int,
    tracking_uri: str | None = None,
    *,
    cfg: RegisterConfig | None = None,
    dst_path: Path | None = None,
) -> Any:
    """Version ``version`` of ``model_name`` as a pyfunc model, checked as :func:`load_champion`
    checks the champion: loading a version found by :func:`alias_version` gets exactly that version
    even if the alias moves in between."""
    cfg = cfg or _default_cfg(model_name, "champion")
    server = connect(resolve_tracking_uri(cfg, tracking_uri), cfg, no_log)
    with retry_settings(cfg):
        found = model_version(server, model_name, str(version))
        return _download_verified(server, found, dst_path)


def _alias_holder(server: Server, model_name: str, alias: str) -> Any:
    champion = champion_version(server, model_name, alias)
    if champion is None:
        raise RegistryError(
            f"no version of {model_name!r} holds alias {alias!r} at {server.uri}; promote one "
            "with `imtext promote`"
        )
    return champion


def _download_verified(server: Server, version: Any, dst_path: Path | None) -> Any:
    """Download ``version``'s files, check them against its registration hash, load them."""
    import mlflow.artifacts

    from imtext.registry.pyfunc import load_verified

    name, uri = version.name, server.uri
    expected = trusted_digest(version, uri)
    # The version's own artifact URI (mlflow-artifacts:/, s3://, file:), resolved here
    # because MLflow's download of a models:/ URI ignores an explicit registry URI.
    source = server.call(
        f"locate version {version.version} of {name!r}",
        server.client.get_model_version_download_uri,
        name,
        str(version.version),
    )
    target = Path(dst_path or tempfile.mkdtemp(prefix="imtext-champion-"))
    local = server.call(
        f"download version {version.version} of {name!r}",
        mlflow.artifacts.download_artifacts,
        artifact_uri=source,
        dst_path=str(target),
        tracking_uri=uri,
    )
    try:
        return load_verified(Path(local), expected)
    except ValueError as exc:
        raise RegistryError(f"version {version.version} of {name!r} at {uri}: {exc}") from None


def trusted_digest(version: Any, uri: str) -> str:
    """The ``imtext.model_sha256`` tag of ``version``, after checking that it was registered by
    the imtext installed here (the code that will run it)."""
    tags = version.tags or {}
    name, number = version.name, version.version
    digest = tags.get(TAG_MODEL_SHA256)
    if not digest:
        raise RegistryError(
            f"version {number} of {name!r} at {uri} has no {TAG_MODEL_SHA256} tag (registered "
            "before imtext recorded it, or not by `imtext register`), so its files cannot be "
            "verified; register its export again and promote the new version"
        )
    registered_with = tags.get(TAG_IMTEXT_VERSION)
    if registered_with != __version__:
        raise RegistryError(
            f"version {number} of {name!r} at {uri} was registered by imtext {registered_with} "
            f"but imtext {__version__} is installed here, and serving runs the installed imtext, "
            f"never the copy in the artifact store; install imtext {registered_with} to serve it, "
            "or register its export again with this one"
        )
    return digest


def _default_cfg(model_name: str, alias: str) -> RegisterConfig:
    return RegisterConfig(
        tracking_uri=None,
        experiment="imtext",
        model_name=model_name,
        alias=alias,
        gate_metric="rsum",
        gate_min_delta=0.0,
        retries=4,
        retry_backoff_s=1.0,
    )


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.6g}"


def _tag_number(value: float | None) -> str:
    return "none" if value is None else repr(value)
