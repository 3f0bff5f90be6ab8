"""The running service: the current :class:`ServingState`, loaded in the background and replaced
whole when the alias moves.

Hot swap: a poller asks the source which version is current every ``poll_seconds``; when it
changed, the new version's encoders and index are built beside the serving state (both are in
memory for that time), then one assignment makes the new state current. A request takes the state
once (:attr:`Service.state`) and answers from it alone, so requests in flight finish on the old
version and none is dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from imtext.config import ServeConfig
from imtext.errors import ImtextError, printable
from imtext.export.runtime import InputError
from imtext.serve.gallery import Gallery
from imtext.serve.index import IndexCache
from imtext.serve.model import LoadedModel
from imtext.serve.state import ServingState, build_state

log = logging.getLogger("imtext.serve")


class ModelSource(Protocol):
    polls: bool

    def describe(self) -> str: ...

    def current_version(self) -> str: ...

    def load(self, version: str) -> LoadedModel: ...


class Service:
    """Holds the serving state of ``source`` over ``gallery``."""

    def __init__(
        self,
        source: ModelSource,
        gallery: Gallery,
        cfg: ServeConfig,
        cache: IndexCache,
        *,
        build: Callable[..., ServingState] = build_state,
    ) -> None:
        self.source, self.gallery, self.cfg, self.cache = source, gallery, cfg, cache
        self._build = build
        self._state: ServingState | None = None
        #: Why the first load failed (the service cannot become ready), else ``None``.
        self.failure: str | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def state(self) -> ServingState | None:
        """The current state (``None`` until the first version is loaded). One attribute read:
        a request that keeps the object it got is unaffected by a later swap."""
        return self._state

    def refresh(self) -> bool:
        """Load the source's current version if it is not the one serving; True if swapped."""
        version = self.source.current_version()
        serving = self._state
        if serving is not None and serving.model.version == version:
            return False
        start = time.monotonic()
        model = self.source.load(version)
        state = self._build(model, self.gallery, self.cfg, self.cache, log.info)
        self._state = state
        before = f"replacing version {serving.model.version}" if serving else "first load"
        log.info(
            "serving %s version %s (%s): gallery %d images, %d captions; index %s %s "
            "(%.1f MB); ready in %.1f s",
            model.name,
            model.version,
            before,
            len(self.gallery),
            len(self.gallery.captions),
            state.index_kind,
            "loaded from the cache" if state.index_source == "loaded" else "built and cached",
            state.index_bytes / 1e6,
            time.monotonic() - start,
        )
        return True

    def start(self, on_failure: Callable[[str], None] = lambda message: None) -> None:
        """Load the first version in the background, then poll (when the source follows an alias
        and ``poll_seconds`` > 0). A failed first load sets :attr:`failure` and calls
        ``on_failure``; a failed later load is logged and the serving version stays."""
        thread = threading.Thread(
            target=self._run, args=(on_failure,), name="imtext-serve-loader", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)

    def _run(self, on_failure: Callable[[str], None]) -> None:
        log.info("loading %s", self.source.describe())
        try:
            self.refresh()
        except (ImtextError, InputError) as exc:  # bad input or settings: say what to fix
            self._fail(str(exc), on_failure)
            return
        except Exception as exc:  # a bug: the trace goes to the log, the reason to the caller
            log.exception("loading %s failed", self.source.describe())
            self._fail(f"{type(exc).__name__}: {exc}", on_failure)
            return
        if not self.source.polls or self.cfg.poll_seconds <= 0:
            return
        self._poll()

    def _fail(self, reason: str, on_failure: Callable[[str], None]) -> None:
        self.failure = printable(reason)
        log.error("could not load %s: %s", self.source.describe(), self.failure)
        on_failure(self.failure)

    def _poll(self) -> None:
        while not self._stop.wait(self.cfg.poll_seconds):
            try:
                self.refresh()
            except Exception as exc:  # keep serving the current version; say why once per poll
                log.warning(
                    "checking %s for a new version failed (still serving version %s): %s",
                    self.source.describe(),
                    self._state.model.version if self._state else "none",
                    printable(str(exc) or type(exc).__name__),
                )
