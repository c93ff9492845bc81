"""The protocol between `AsyncIPC` and a backend.

A backend moves records between processes. It knows bytes and records, never
events or caches: `AsyncIPC` hands it records to append, and receives records
through a `RecordSink`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from ..records import Record

__all__ = ["Backend", "RecordSink"]


class RecordSink(Protocol):
    """What a backend delivers to (implemented by `AsyncIPC`)."""

    def deliver(self, records: Sequence[Record]) -> None:
        """Live records from peers, each sender's in the order it sent them."""

    def restore(self, records: Sequence[Record]) -> None:
        """Records written before this process started (snapshot, retained log).

        Only their state matters: cache records are applied, messages ignored.
        """

    def written(self, records: Sequence[Record]) -> None:
        """Records of this process's own that are now stored: their state applies
        here as it does in every peer (cache records; messages are ignored).

        Called by the backend for every stored write, even one whose caller was
        cancelled meanwhile, so this process's mirror never lacks what its peers
        have.
        """

    def state(self) -> Iterable[Record]:
        """The current cache state, as records, for a snapshot."""

    def state_version(self) -> int:
        """A number that changes whenever `state()` would."""

    def mirror_ready(self, ready: bool) -> None:
        """Whether the mirror is current. While False (say, the connection to Redis
        is being re-established and records may have been missed), cache reads go
        to `Backend.fetch` instead of the mirror."""

    def gap(self, peer: str, lost: int | None) -> None:
        """`lost` records of `peer` were gone before they could be read (None: an
        unknown number, maybe none).

        The backend reloads the cache state (snapshot, then retained log) right
        after telling the sink; the sink tells the application.
        """


class Backend(Protocol):
    """A transport for records. One instance serves one `AsyncIPC` start."""

    node: int
    """This process's id for the last-writer-wins tie-break (unique per start)."""

    max_record_size: int

    async def start(self, sink: RecordSink) -> None:
        """Join: load the present state into `sink`, then deliver live records."""

    async def append(self, records: Sequence[Record]) -> None:
        """Write records; when this returns every live peer will receive them, and
        the cache records among them were passed to `RecordSink.written`."""

    async def close(self) -> None:
        """Leave: stop reading, release every file, thread and task."""

    def abandon(self) -> None:
        """Release resources synchronously when the event loop is already gone."""

    async def fetch(self, topic: str, key: bytes) -> Record | None:
        """The current state record of one cache key, from the shared medium."""

    def stats(self) -> dict[str, Any]:
        """Counters and health for `AsyncIPC.stats()`."""
