"""Bearer tokens and their scopes.

An input-gradient endpoint is an oracle for adversarial attacks and parameter
gradients expose the model, so each kind of result has its own scope:

=================== ==============================================================
``predict``         Predict, and activations returned with a gradient call
``input-gradients`` gradients with respect to the input (``targets.input``), and Explain
``layer-gradients`` gradients with respect to layers (``targets.layers``, ``all_layers``)
``param-gradients`` gradients with respect to parameters (``targets.parameters``, ``all_parameters``)
=================== ==============================================================

A gradient call needs every scope its targets imply. An Explain call, whatever its
method, needs ``input-gradients``: an attribution map exposes the input gradient (or,
for Grad-CAM, as much as it does). GetModelInfo needs a valid
token and no scope: it describes the public contract. Health and reflection need
no token.

Tokens come from a file (``--tokens-file``) or ``$LAYERGRAD_TOKENS``, never from
the command line; one token a line (``;`` also separates entries in the
environment variable)::

    sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 predict,input-gradients  # lab
    s3cr3t-token-value *   # every scope; a literal token, better stored as sha256:

``sha256:<hex>`` stores the token's SHA-256 (``printf %s TOKEN | sha256sum``), so
the file holds no secret; anything else is the token itself. Presented tokens
are hashed and compared with every entry in constant time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import pathlib
from collections.abc import Iterable

from layergrad_server.errors import PermissionDenied, Unauthenticated

PREDICT = "predict"
INPUT_GRADIENTS = "input-gradients"
LAYER_GRADIENTS = "layer-gradients"
PARAM_GRADIENTS = "param-gradients"
SCOPES = (PREDICT, INPUT_GRADIENTS, LAYER_GRADIENTS, PARAM_GRADIENTS)
ALL_SCOPES = "*"


class TokenFileError(ValueError):
    """A tokens file or variable that cannot be used; says which line and why."""


@dataclasses.dataclass(frozen=True)
class Principal:
    """A caller identified by its token: the token's name and granted scopes."""

    name: str
    scopes: frozenset[str]

    def require(self, scopes: Iterable[str]) -> None:
        """Raises PermissionDenied naming every scope of ``scopes`` not granted."""
        missing = [scope for scope in SCOPES if scope in set(scopes) and scope not in self.scopes]
        if missing:
            raise PermissionDenied(
                f"the token {self.name!r} lacks the scope{'s' if len(missing) > 1 else ''} "
                f"{', '.join(missing)} that this call needs",
                reason="MISSING_SCOPE",
            )


@dataclasses.dataclass(frozen=True)
class _Entry:
    digest: bytes
    principal: Principal


class TokenStore:
    """The accepted tokens, kept as SHA-256 digests."""

    def __init__(self, entries: Iterable[_Entry]) -> None:
        """Use ``parse`` or ``from_file``."""
        self._entries = tuple(entries)
        if not self._entries:
            raise TokenFileError("no tokens given")

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> tuple[_Entry, ...]:
        return self._entries

    @classmethod
    def parse(cls, text: str, source: str) -> TokenStore:
        """Reads entries ``<token | sha256:hex> <scope,scope|*> [# name]``, one a line or ``;``-separated."""
        entries = []
        for number, raw in enumerate(text.replace(";", "\n").splitlines(), start=1):
            line, _, comment = raw.partition("#")
            words = line.split()
            if not words:
                continue
            where = f"{source}, entry {number}"
            if len(words) != 2:
                raise TokenFileError(
                    f"{where}: expected '<token or sha256:HEX> <scopes>', got {len(words)} words"
                )
            secret, scope_list = words
            if secret.startswith("sha256:"):
                try:
                    digest = bytes.fromhex(secret.removeprefix("sha256:"))
                except ValueError:
                    digest = b""
                if len(digest) != 32:
                    raise TokenFileError(f"{where}: sha256: needs 64 hexadecimal digits")
            else:
                digest = hashlib.sha256(secret.encode()).digest()
            scopes = {s for s in scope_list.split(",") if s}
            if ALL_SCOPES in scopes:
                scopes = set(SCOPES)
            unknown = scopes - set(SCOPES)
            if unknown or not scopes:
                raise TokenFileError(
                    f"{where}: unknown or missing scope {', '.join(sorted(unknown)) or '(none)'}; "
                    f"valid scopes: {', '.join(SCOPES)}, or * for all"
                )
            name = comment.strip() or f"{source}:{number}"
            entries.append(_Entry(digest, Principal(name, frozenset(scopes))))
        return cls(entries)

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> TokenStore:
        try:
            text = pathlib.Path(path).read_text()
        except OSError as error:
            raise TokenFileError(f"cannot read tokens file {path}: {error.strerror}") from None
        return cls.parse(text, str(path))

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an ``authorization: Bearer <token>`` header; Unauthenticated otherwise."""
        if not authorization:
            raise Unauthenticated(
                "this server requires a bearer token: send the metadata 'authorization: Bearer <token>'",
                reason="MISSING_TOKEN",
            )
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(
                "the authorization metadata must be 'Bearer <token>'", reason="MALFORMED_TOKEN"
            )
        digest = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for entry in self._entries:  # every entry is compared, whatever matches
            if hmac.compare_digest(entry.digest, digest):
                found = entry.principal
        if found is None:
            raise Unauthenticated("the bearer token is not valid", reason="INVALID_TOKEN")
        return found


def gradient_scopes(*, input: bool, layers: bool, parameters: bool, activations: bool) -> set[str]:
    """The scopes a gradient call needs, from what it asks for."""
    needed = set()
    if input:
        needed.add(INPUT_GRADIENTS)
    if layers:
        needed.add(LAYER_GRADIENTS)
    if parameters:
        needed.add(PARAM_GRADIENTS)
    if activations:
        needed.add(PREDICT)
    return needed
