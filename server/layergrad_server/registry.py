"""The served models by name and version, each loading, ready or failed (no gRPC).

Every configured model gets an entry at start, in state ``LOADING``; the loader
marks it ``READY`` with its engine or ``FAILED`` with the reason. ``get`` is how a
call finds its engine: an empty name means the default model, an empty version the
served one; an unknown name is ``NotFound`` listing the served names, a model still
loading ``Unavailable`` (retry), one that failed ``FailedPrecondition`` with the cause
(it does not come back without a restart).
"""

from __future__ import annotations

import dataclasses
import enum
import threading
from collections.abc import Callable

from layergrad_server.engine import Engine
from layergrad_server.errors import FailedPrecondition, NotFound, Unavailable, shown


class ModelState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclasses.dataclass
class ModelEntry:
    """One configured model. ``engine`` is set once it is ready; ``message`` says why it failed."""

    name: str
    version: str
    architecture: str
    state: ModelState = ModelState.LOADING
    engine: Engine | None = None
    message: str = ""
    weights_source: str = ""
    #: What the transport derived from the engine once (for example the GetModelInfo answer).
    described: object = None


class Registry:
    """name -> model entry; the first model added is the default unless another is named."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, ModelEntry] = {}
        self._default: str | None = None
        self._listeners: list[Callable[[ModelEntry], None]] = []

    @property
    def default(self) -> str:
        return self._default or ""

    def on_change(self, listener: Callable[[ModelEntry], None]) -> None:
        """Calls ``listener(entry)`` after every state change (health reporting)."""
        self._listeners.append(listener)

    def add(self, name: str, version: str, architecture: str, *, default: bool = False) -> ModelEntry:
        """Registers a model about to load."""
        with self._lock:
            if name in self._entries:
                raise ValueError(f"model {name!r} is configured twice")
            entry = ModelEntry(name, version, architecture)
            self._entries[name] = entry
            if default or self._default is None:
                self._default = name
        self._changed(entry)
        return entry

    def ready(self, name: str, engine: Engine, weights_source: str = "", described: object = None) -> None:
        entry = self._entries[name]
        entry.engine, entry.weights_source, entry.described = engine, weights_source, described
        entry.architecture = engine.adapter.name
        entry.state = ModelState.READY
        self._changed(entry)

    def failed(self, name: str, message: str) -> None:
        entry = self._entries[name]
        entry.message = message
        entry.state = ModelState.FAILED
        self._changed(entry)

    def entries(self) -> list[ModelEntry]:
        """Every model, in configuration order."""
        with self._lock:
            return list(self._entries.values())

    def entry(self, name: str = "", version: str = "") -> ModelEntry:
        """The entry a request names (see the module docstring), in any state."""
        key = name or self.default
        found = self._entries.get(key)
        if found is None:
            served = ", ".join(sorted(self._entries)) or "none yet"
            message = f"model {shown(name)} is not served" if name else "no model is configured"
            raise NotFound(f"{message}; served models: {served}", reason="MODEL_NOT_FOUND")
        if version and version != found.version:
            raise NotFound(
                f"model {found.name!r} has no version {shown(version)}; served version: {found.version!r}",
                reason="MODEL_VERSION_NOT_FOUND",
            )
        return found

    def get(self, name: str = "", version: str = "") -> ModelEntry:
        """The ready entry a request names, or the error that says why it cannot be served."""
        found = self.entry(name, version)
        if found.state is ModelState.LOADING:
            raise Unavailable(f"model {found.name!r} is still loading; retry shortly", reason="MODEL_LOADING")
        if found.state is ModelState.FAILED:
            raise FailedPrecondition(
                f"model {found.name!r} failed to load: {found.message}", reason="MODEL_LOAD_FAILED"
            )
        return found

    def all_settled(self) -> bool:
        """Whether no model is still loading."""
        return all(entry.state is not ModelState.LOADING for entry in self.entries())

    def _changed(self, entry: ModelEntry) -> None:
        for listener in self._listeners:
            listener(entry)
