"""The reader's position in the stream, and the accounting that tells when
entries went (trimmed, deleted, lost in a restart or with the stream) before
this reader read them."""

from __future__ import annotations

from .replies import StreamId, StreamInfo, id_before, id_tuple

__all__ = ["Position"]


class Position:
    """Where a reader is in the stream: the last stream id read, and how many
    entries the stream had ever received up to it (`XINFO` `entries-added`;
    None when unknown).

    Args:
        stream_maxlen: The stream's length limit (Redis 6 guesses a gap from a
            full stream).

    Example:
        >>> position = Position(stream_maxlen=10)
        >>> position.last_id, position.added
        (b'0-0', None)
    """

    def __init__(self, stream_maxlen: int) -> None:
        self.stream_maxlen = stream_maxlen
        self.last_id: bytes | str = b"0-0"
        self.added: int | None = None
        self.deleted_seen: StreamId | None = None  # max-deleted-entry-id already handled

    def move_to_end(self, info: StreamInfo | None) -> None:
        """Stand at the end of the stream `info` describes (at the start of none)."""
        self.last_id, self.added = (info.last_raw, info.added) if info else (b"0-0", 0)

    def check(
        self,
        info: StreamInfo | None,
        *,
        unread: int | None = None,
        at_position: bool = False,
    ) -> tuple[bool, int | None]:
        """Whether records may have gone before this reader read them, and how many
        (None: unknown); if so, the position moves past what is gone.

        Trimming removes the oldest entries and leaves `max-deleted-entry-id`
        alone (only XDEL moves it): what tells is the oldest entry left being
        past the position while fewer entries are left after the position than
        were ever added after it (`entries-added`, Redis 7+). `unread`, when
        known, is how many entries the stream holds after the position: then
        any entry added after the position and no longer there shows in the
        counts, wherever it was (Redis 7+). `at_position`: the entry at the
        position is still there, so the stream is the one this reader read (a
        count that went backwards then only says that the stream was made anew
        earlier, while this reader followed it live, and is righted silently).
        """
        position = id_tuple(self.last_id)
        gap = False  # (a restart that kept the stream lost nothing: the checks below)
        lost: int | None = None  # None: how many is unknown
        if info is None:  # no stream: deleted, or a restarted server without persistence
            if position == (0, 0):
                return False, None  # there never was one: nothing to lose
            gap = True
            self.last_id, self.added = b"0-0", 0  # a new stream will be all news
        elif info.last < position:  # the stream is behind what was read: restarted
            gap = True
            self.last_id, self.added = info.last_raw, info.added
        elif info.first is None or info.first > position:
            # Nothing at or before the position is left: every entry left is after it.
            if info.added is not None and self.added is not None:
                lost = info.added - self.added - info.length
                if lost < 0:  # the counts do not add up: the stream was made anew
                    lost = None
                gap = gap or lost != 0
            else:  # Redis 6, or a count lost to an earlier gap: guess from a full stream
                gap = gap or (
                    position > (0, 0)
                    and (info.length >= self.stream_maxlen or info.first is None)
                    and info.last > position
                )
            if gap:  # read on from the oldest entry left
                if info.first is None:
                    self.last_id, self.added = info.last_raw, info.added
                else:
                    self.last_id = id_before(info.first)
                    self.added = None if info.added is None else info.added - info.length
        elif unread is not None and info.added is not None and self.added is not None:
            # Added after the position = still there after it + gone unread
            # (deleted, or lost when the stream was made anew: counts that went
            # backwards). Righted here, so a gap is reported once.
            gone = info.added - self.added - unread
            if gone > 0 or (gone < 0 and not at_position):
                gap, lost = True, (gone if gone > 0 else None)
            self.added = info.added - unread
        elif (
            info.deleted is not None
            and info.deleted > position
            and (self.deleted_seen is None or info.deleted > self.deleted_seen)
        ):
            gap = True  # entries after the position were deleted (XDEL) before read
            self.added = None
        if info is not None and info.deleted is not None:
            self.deleted_seen = info.deleted  # each deletion is reported once
        return gap, lost
