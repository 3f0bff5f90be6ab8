"""Concurrent promotions against a real SQLite store: the alias ends on the best version each time.

Two ``promote`` calls race (threads with their own clients, released together by a barrier), each
judging its candidate against the champion of the moment. Without mutual exclusion both judge
against the old champion, both move the alias, and the slower one wins even when it is worse.
"""

from __future__ import annotations

import threading
import time

import pytest
from mlflow.entities import Metric
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST as NOT_FOUND
from mlflow.tracking import MlflowClient

from imtext.registry import RegistryError, promote
from imtext.registry.lock import lock_name
from tests.unit.test_registry import make_cfg

RACES = 20


def client_of(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def add_version(client: MlflowClient, name: str, rsum: float) -> str:
    """A model version whose run logged ``rsum`` (all ``promote`` reads); no artifacts needed."""
    experiment = client.get_experiment_by_name("race") or client.create_experiment("race")
    experiment_id = experiment if isinstance(experiment, str) else experiment.experiment_id
    run = client.create_run(experiment_id)
    client.log_batch(run.info.run_id, metrics=[Metric("rsum", rsum, 0, 0)])
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    source = f"{run.info.artifact_uri}/model"  # servers accept only a source inside the run
    return str(client.create_model_version(name, source, run_id=run.info.run_id).version)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A SQLite store with champion v1 (rsum 10) and candidates v2 (rsum 20) and v3 (rsum 30)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = make_cfg(uri, gate_min_delta=0.0)
    client = client_of(uri)
    versions = [add_version(client, cfg.model_name, rsum) for rsum in (10.0, 20.0, 30.0)]
    assert versions == ["1", "2", "3"]
    return cfg, client


def race(cfg, versions: list[str]) -> dict[str, object]:
    """Promote ``versions`` at once, one thread each; the decision (or exception) of each."""
    barrier = threading.Barrier(len(versions))
    results: dict[str, object] = {}

    def run(version: str) -> None:
        barrier.wait()
        try:
            results[version] = promote(cfg, version)
        except Exception as exc:  # recorded, so the test shows it instead of a silent thread
            results[version] = exc

    threads = [threading.Thread(target=run, args=(v,)) for v in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def run_races(cfg, client: MlflowClient, races: int = RACES) -> None:
    """``races`` times: champion v1, then v2 and v3 promoted at once; the alias must end on v3."""
    for attempt in range(races):
        client.set_registered_model_alias(cfg.model_name, cfg.alias, "1")
        # Alternate who starts first so both orders are tried.
        results = race(cfg, ["2", "3"] if attempt % 2 else ["3", "2"])
        for version, result in results.items():
            assert not isinstance(result, Exception), f"race {attempt}, v{version}: {result!r}"
        champion = str(client.get_registered_model(cfg.model_name).aliases[cfg.alias])
        assert champion == "3", f"race {attempt}: alias on v{champion}, decisions {results}"
        three, two = results["3"], results["2"]
        assert three.promoted
        if two.promoted:
            # v2 went first and was promoted over v1; then v3 must have been judged against v2.
            assert three.previous_champion == "2", f"race {attempt}: {results}"
        else:
            assert two.previous_champion == "3" and "does not beat" in two.reason
        assert not client.search_registered_models(f"name = '{lock_name(cfg)}'")


def test_concurrent_promotions_leave_the_alias_on_the_best_version(store):
    cfg, client = store
    run_races(cfg, client)


def test_a_live_lock_held_by_another_promoter_is_waited_for_then_refused(store):
    cfg, client = store
    expires = time.time() + 600
    client.create_registered_model(
        lock_name(cfg),
        tags={"imtext.lock.owner": "someone-else", "imtext.lock.expires": repr(expires)},
    )
    start = time.monotonic()
    with pytest.raises(RegistryError, match="held by someone-else") as error:
        promote(cfg, "2", lock_wait_s=1.0)
    assert 1.0 <= time.monotonic() - start < 10
    assert lock_name(cfg) in str(error.value)
    assert "1" == str(client.get_registered_model(cfg.model_name).aliases.get(cfg.alias, "1"))


def test_an_expired_lock_left_by_a_killed_promoter_is_broken(store):
    cfg, client = store
    client.create_registered_model(
        lock_name(cfg),
        tags={"imtext.lock.owner": "killed-process", "imtext.lock.expires": repr(time.time() - 1)},
    )
    assert promote(cfg, "3", lock_wait_s=5.0).promoted
    assert str(client.get_registered_model(cfg.model_name).aliases[cfg.alias]) == "3"
    assert not client.search_registered_models(f"name = '{lock_name(cfg)}'")


class VanishingLockClient:
    """A registry whose lock model was taken and is released just as we ask for it: the SQL
    store's create finds the name taken, reads the model back to word its error, and finds it
    gone ("not found"). Then the lock is free."""

    def __init__(self):
        self.models: dict[str, dict] = {}
        self.creates = 0

    def create_registered_model(self, name, tags=None, description=None):
        from mlflow.exceptions import MlflowException

        self.creates += 1
        if self.creates == 1:
            raise MlflowException("Registered Model with name=x not found", NOT_FOUND)
        self.models[name] = dict(tags or {})

    def get_registered_model(self, name):
        from mlflow.exceptions import MlflowException

        if name not in self.models:
            raise MlflowException(f"{name} not found", NOT_FOUND)
        return type("Model", (), {"tags": self.models[name]})()


def test_a_lock_released_while_the_store_words_its_refusal_is_taken_on_the_next_try():
    from imtext.registry.lock import acquire
    from imtext.registry.retry import Server

    client = VanishingLockClient()
    lease = acquire(Server("sqlite:///x.db", client), "m.lock", "champion", 5.0, 60.0, print)
    assert client.creates == 2 and client.models["m.lock"]["imtext.lock.owner"] == lease.owner
