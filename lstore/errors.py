"""Error classes shared by the store, the registry client and the runner.

Callers branch on the class and on `temporary`, never on message text. Every error keeps the
reference, digest and path it concerns as attributes. Its message names them and, where there
is something to do, states what to do.
"""

from __future__ import annotations


class LstoreError(Exception):
    """Base class of every error lstore raises on purpose.

    `temporary` is true when repeating the same operation later may succeed (a timeout, a 5xx,
    a rate limit), so retry loops and the CLI exit code can depend on it.
    """

    temporary: bool = False

    def __init__(
        self,
        message: str,
        *,
        ref: str | None = None,
        digest: str | None = None,
        path: str | None = None,
        temporary: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.ref = ref
        self.digest = digest
        self.path = path
        if temporary is not None:
            self.temporary = temporary

    def __str__(self) -> str:
        return self.message


class InvalidReferenceError(LstoreError):
    """An image reference that does not parse."""


class InvalidArgumentError(LstoreError):
    """A command-line value or config entry that is malformed."""


class NotFoundError(LstoreError):
    """An image, blob, manifest, container or volume that does not exist."""


class AlreadyExistsError(LstoreError):
    """A name that is already taken (container name, volume, port)."""


class RegistryError(LstoreError):
    """A registry responded with an error status or with content lstore cannot use.

    `status` is the HTTP status (0 when no response arrived) and `codes` holds the error codes
    of the distribution spec's JSON error body, such as MANIFEST_UNKNOWN or TOOMANYREQUESTS.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        codes: tuple[str, ...] = (),
        **context: object,
    ) -> None:
        super().__init__(message, **context)  # type: ignore[arg-type]
        self.status = status
        self.codes = codes


class AuthError(RegistryError):
    """Authentication with a registry or its token server failed."""


class UnsupportedError(LstoreError):
    """Content that is valid but that lstore does not handle, such as schema 1 manifests."""


class IntegrityError(LstoreError):
    """Content whose digest, diffID or size differs from what its descriptor states."""

    def __init__(self, message: str, *, expected: str = "", actual: str = "", **context: object):
        super().__init__(message, **context)  # type: ignore[arg-type]
        self.expected = expected
        self.actual = actual


class UnsafeLayerError(LstoreError):
    """A layer entry that would create or write something outside its snapshot directory."""

    def __init__(self, message: str, *, entry: str = "", **context: object) -> None:
        super().__init__(message, **context)  # type: ignore[arg-type]
        self.entry = entry


class StoreError(LstoreError):
    """The store on disk is unusable: locked, corrupt or out of space."""


class ContainerError(LstoreError):
    """A container could not be created, started or changed."""
