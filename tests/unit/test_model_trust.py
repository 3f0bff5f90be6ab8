"""Serving never runs code from the artifact store (issue 15, bug 6).

The registered pyfunc holds a copy of imtext (``code/imtext``) and a model file that
``mlflow.pyfunc.load_model`` would import. ``load_champion`` instead checks every downloaded file
against the version's ``imtext.model_sha256`` tag and builds the model from the installed imtext.
Each tampering below writes a marker file when the stored code runs; the marker must never appear.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import imtext
from imtext.registry import RegistryError, load_champion, promote
from imtext.registry.pyfunc import model_digest
from tests.unit import test_registry
from tests.unit.test_registry import client_for

# The registry tests' fixtures: a working directory, the stand-in stages, a SQLite store.
workdir, stages, cfg = test_registry.workdir, test_registry.stages, test_registry.cfg


@pytest.fixture
def champion(cfg, stages, workdir):
    """Version 1, registered and promoted; its stored model directory in the local store."""
    stages.register(cfg, 60.0)
    promote(cfg, 1)
    (model_file,) = (workdir / "mlartifacts").rglob("imtext_encoders.py")
    return model_file.parent


def plant(stored: Path, marker: Path) -> None:
    """What an attacker with write access to the bucket does: code that runs on import."""
    init = stored / "code" / "imtext" / "__init__.py"
    init.write_text(init.read_text() + f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    model_file = stored / "imtext_encoders.py"
    model_file.write_text(f"open({str(marker)!r}, 'w').write('ran')\n" + model_file.read_text())


def test_registration_records_the_digest_and_the_imtext_version(cfg, champion):
    tags = client_for(cfg).get_model_version(cfg.model_name, "1").tags
    assert re.fullmatch(r"[0-9a-f]{64}", tags["imtext.model_sha256"])
    assert tags["imtext.model_sha256"] == model_digest(champion)
    assert tags["imtext.version"] == imtext.__version__


def test_changed_files_in_the_artifact_store_are_refused_and_never_run(cfg, champion, tmp_path):
    marker = tmp_path / "ran"
    plant(champion, marker)
    with pytest.raises(RegistryError, match="changed in the artifact store: do not serve them"):
        load_champion(cfg.model_name, tracking_uri=cfg.tracking_uri)
    assert not marker.exists()


def test_even_with_a_matching_tag_the_stored_code_is_not_imported(cfg, champion, tmp_path):
    # Someone who can write to MLflow as well can make the tag match the planted code; serving
    # still runs the installed imtext, so the planted code stays inert.
    marker = tmp_path / "ran"
    plant(champion, marker)
    client_for(cfg).set_model_version_tag(
        cfg.model_name, "1", "imtext.model_sha256", model_digest(champion)
    )
    model = load_champion(cfg.model_name, tracking_uri=cfg.tracking_uri)
    embeddings = model.predict(pd.DataFrame({"text": ["a red square"]}))
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-4)
    assert not marker.exists()
    # The class that answers comes from the installed package, not from the download.
    source = Path(sys.modules[type(model.unwrap_python_model()).__module__].__file__).resolve()
    assert source.is_relative_to(Path(imtext.__file__).resolve().parent)


def test_a_version_without_the_digest_or_from_another_imtext_is_refused(cfg, champion):
    client = client_for(cfg)
    client.set_model_version_tag(cfg.model_name, "1", "imtext.version", "0.0.1")
    with pytest.raises(RegistryError, match="registered by imtext 0.0.1 but imtext .* installed"):
        load_champion(cfg.model_name, tracking_uri=cfg.tracking_uri)
    client.delete_model_version_tag(cfg.model_name, "1", "imtext.model_sha256")
    with pytest.raises(RegistryError, match="has no imtext.model_sha256 tag"):
        load_champion(cfg.model_name, tracking_uri=cfg.tracking_uri)
