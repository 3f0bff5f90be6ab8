"""Where the served model comes from: a registered version (``models:/NAME@ALIAS`` or
``models:/NAME/VERSION``) or an export directory, loaded as ONNX Runtime encoders.

A source answers two questions: which version is current (:meth:`current_version`, cheap, polled)
and what that version is (:meth:`load`). Registered versions are downloaded to a temporary folder
under the cache, checked against the hash recorded at registration
(:func:`imtext.registry.load_model_version`), loaded, and the folder removed: ONNX Runtime keeps the
sessions in memory.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from imtext.config import RegisterConfig
from imtext.errors import ConfigError
from imtext.export.runtime import OnnxEncoders
from imtext.registry import alias_version, load_model_version
from imtext.registry.pyfunc import model_digest

MODEL_URI = re.compile(r"^models:/(?P<name>[^@/]+)(?:@(?P<alias>[^@/]+)|/(?P<version>\d+))$")


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """One version's encoders, with the names a response reports."""

    name: str
    version: str
    #: sha256 of the model's files: the cache key (version numbers repeat across stores).
    digest: str
    encoders: OnnxEncoders

    @property
    def cache_key(self) -> str:
        return f"{self.name}-v{self.version}-{self.digest[:16]}"


class ExportDirSource:
    """An export directory (``imtext export``'s output): one version, named by its content hash."""

    polls = False

    def __init__(self, export_dir: Path) -> None:
        self.export_dir = Path(export_dir)
        self.name = self.export_dir.resolve().name or "export"
        self._digest: str | None = None

    def describe(self) -> str:
        return f"export directory {self.export_dir}"

    def current_version(self) -> str:
        if self._digest is None:
            self._digest = model_digest(self.export_dir)
        return f"sha256-{self._digest[:12]}"

    def load(self, version: str) -> LoadedModel:
        encoders = OnnxEncoders.load(self.export_dir)
        return LoadedModel(self.name, version, model_digest(self.export_dir), encoders)


class RegistrySource:
    """A registered model in MLflow: an alias (followed as it moves) or a fixed version."""

    def __init__(
        self,
        uri: str,
        tracking_uri: str | None,
        cfg: RegisterConfig,
        download_root: Path,
    ) -> None:
        match = MODEL_URI.match(uri)
        if match is None:
            raise ConfigError(
                f"--model {uri!r}: expected models:/NAME@ALIAS (e.g. models:/imtext-dual-path"
                "@champion) or models:/NAME/VERSION"
            )
        self.name = match["name"]
        self.alias, self.version = match["alias"], match["version"]
        self.polls = self.alias is not None
        self.tracking_uri, self.cfg = tracking_uri, cfg
        self.download_root = Path(download_root)

    def describe(self) -> str:
        where = f"@{self.alias}" if self.alias else f"/{self.version}"
        return f"models:/{self.name}{where}"

    def current_version(self) -> str:
        if self.alias is None:
            return str(self.version)
        return alias_version(self.name, self.alias, self.tracking_uri, cfg=self.cfg)

    def load(self, version: str) -> LoadedModel:
        self.download_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="download-", dir=self.download_root) as tmp:
            model = load_model_version(
                self.name, version, self.tracking_uri, cfg=self.cfg, dst_path=Path(tmp)
            )
            encoders = model.unwrap_python_model().encoders
            # load_verified checked these files against the registration hash.
            digest = model_digest(Path(tmp))
        return LoadedModel(self.name, str(version), digest, encoders)
