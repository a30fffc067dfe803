"""A local append-only spool: records the store could not take wait here, on disk, until it can.

Layout: `<dir>/<name>-<seq:012d>.jsonl`, one JSON object per line (0600 files in a 0700 directory). Each
`append` writes one batch and fsyncs it (and the directory when it made a segment), so a record the
writer handed over survives a crash. The newest segment takes appends until it reaches `segment_bytes`;
an open always starts a new one, so a line torn by a crash is never joined to a later one.

Replay reads the oldest segment from a cursor kept in memory (`read`), and the writer `commit`s what the
store took; a segment read to its end is unlinked. After a crash the cursor is gone and the oldest segment
is read again from its start: the store skips the records it already has (its inserts are idempotent by
request id or record id), so nothing is doubled. A torn last line, or a line that cannot be read back, is
skipped and logged, never fatal.

The spool is bounded: a batch that would take it past `max_bytes` is dropped and counted (`dropped`), and
so is one the disk refuses (full, I/O error); either is logged once per episode.

Not safe for concurrent use by itself beyond its lock: the writer calls it from one worker thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from .logs import event

log = logging.getLogger("llmfleet.spool")

T = TypeVar("T")
Encode = Callable[[T], dict[str, Any]]
Decode = Callable[[dict[str, Any]], T]

SEGMENT_BYTES = 4 * 1024 * 1024
# floats as repr (they read back exactly); a value JSON has no form for (a Path, say) as its text, as the
# store keeps it; ASCII only, so no line holds a raw newline
_dumps = json.JSONEncoder(default=str, separators=(",", ":")).encode


def dataclass_codec(cls: type[T]) -> tuple[Encode[T], Decode[T]]:
    """JSON-ready dicts for a dataclass, and back; a field a later version dropped is ignored on the way
    back, a field it added takes its default."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    def encode(record: T) -> dict[str, Any]:
        return dataclasses.asdict(record)  # type: ignore[call-overload,no-any-return]

    def decode(data: dict[str, Any]) -> T:
        return cls(**{k: v for k, v in data.items() if k in names})

    return encode, decode


@dataclass
class _Segment:
    seq: int
    path: Path
    size: int  # bytes on disk
    lines: int  # complete lines in it (a torn last line is not one)


@dataclass(frozen=True)
class Chunk(Generic[T]):
    """Records read from the oldest segment, from `start` to `end` (byte offsets); `commit` it once the
    store has them."""

    records: list[T]
    seq: int
    start: int
    end: int
    lines: int  # complete lines read: the records and the lines that could not be read back


class Spool(Generic[T]):
    def __init__(
        self,
        directory: Path,
        name: str,
        encode: Encode[T],
        decode: Decode[T],
        max_bytes: int,
        segment_bytes: int = SEGMENT_BYTES,
        ts_key: str = "ts",
    ) -> None:
        self.directory = directory
        self.name = name
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._encode = encode
        self._decode = decode
        self._ts_key = ts_key  # the records' own time, for the age of the oldest
        self._pattern = re.compile(rf"^{re.escape(name)}-(\d{{12}})\.jsonl$")
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._active: int | None = None  # fd of the last segment while it takes appends
        self._lockfile: int | None = None
        self._next_seq = 0
        self._cursor = 0  # offset in the oldest segment up to which the store has the records
        self._consumed = 0  # and the complete lines before it
        self._bytes = 0
        self._records = 0
        self._oldest_ts: float | None = None
        self._dropping = False
        self.dropped = 0
        self.unreadable = 0  # lines skipped on replay: torn, or not a record

    # ----- figures (read from the event loop; each is one attribute) -----
    @property
    def empty(self) -> bool:
        return not self._segments

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def records(self) -> int:
        return self._records

    @property
    def oldest_ts(self) -> float | None:
        """The time of the oldest record not yet in the store (its `ts`); None when empty."""
        return self._oldest_ts if self._segments else None

    def age(self, now: float | None = None) -> float:
        oldest = self.oldest_ts
        return 0.0 if oldest is None else max(0.0, (time.time() if now is None else now) - oldest)

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        return {
            "bytes": self.bytes,
            "records": self.records,
            "oldest_age_seconds": round(self.age(now), 3),
            "dropped": self.dropped,
        }

    # ----- open and close -----
    def open(self) -> None:
        """Make the directory (0700), take its lock for this name, and count what an earlier run left."""
        with self._lock:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if self.directory.stat().st_mode & 0o077:
                self.directory.chmod(0o700)
            self._take_lock()
            found = sorted(
                (int(m.group(1)), entry)
                for entry in self.directory.iterdir()
                if (m := self._pattern.match(entry.name))
            )
            self._segments = []
            for seq, path in found:
                segment = self._scan(seq, path)
                if segment is not None:
                    self._segments.append(segment)
            self._next_seq = found[-1][0] + 1 if found else 0
            self._cursor = self._consumed = 0
            self._bytes = sum(s.size for s in self._segments)
            self._records = sum(s.lines for s in self._segments)
            self._oldest_ts = self._peek_ts()

    def _take_lock(self) -> None:
        if self._lockfile is not None:
            return
        fd = os.open(self.directory / f"{self.name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OSError(
                f"spool {self.directory}/{self.name}-*: another process (an agent with the same state_dir or"
                " store.spool_dir?) is using it"
            ) from None
        self._lockfile = fd

    def _scan(self, seq: int, path: Path) -> _Segment | None:
        """A segment an earlier run left: its complete lines counted; a torn last line is logged."""
        size, lines, torn = _measure(path)
        if size == 0:
            path.unlink(missing_ok=True)
            return None
        if torn:
            event(
                log,
                logging.WARNING,
                f"{self.name} spool: the last line of {path.name} is torn (the agent stopped while writing"
                " it); it is skipped",
                file=str(path),
            )
        return _Segment(seq, path, size, lines)

    def close(self) -> None:
        """Close the files; what is spooled stays for the next open."""
        with self._lock:
            self._close_active()
            if self._lockfile is not None:
                os.close(self._lockfile)  # releases the lock
                self._lockfile = None

    def _close_active(self) -> None:
        if self._active is not None:
            with contextlib.suppress(OSError):
                os.close(self._active)
            self._active = None

    # ----- append -----
    def append(self, records: Sequence[T]) -> bool:
        """Write the batch behind what the spool holds and fsync it. False when it was dropped: the spool
        would pass `max_bytes`, or the disk refused it."""
        lines: list[str] = []
        first_ts: float | None = None
        for record in records:
            try:
                data = self._encode(record)
                lines.append(_dumps(data))
            except (TypeError, ValueError) as exc:  # a record that has no JSON form: it would never replay
                self.dropped += 1
                event(
                    log,
                    logging.ERROR,
                    f"{self.name} spool: a record with no JSON form is dropped",
                    error=repr(exc),
                )
                continue
            if first_ts is None:
                first_ts = _as_ts(data.get(self._ts_key))
        if not lines:
            return True
        blob = ("\n".join(lines) + "\n").encode()
        with self._lock:
            assert self._lockfile is not None, "spool is not open"
            if self._bytes + len(blob) > self.max_bytes:
                self._drop(len(lines), None)
                return False
            was_empty = not self._segments
            try:
                self._write(blob, len(lines))
            except OSError as exc:
                self._drop(len(lines), exc)
                return False
            self._records += len(lines)
            if was_empty:
                self._oldest_ts = first_ts if first_ts is not None else time.time()
            if self._dropping:
                self._dropping = False
                event(log, logging.WARNING, f"{self.name} spool takes records again", dropped=self.dropped)
            return True

    def _write(self, blob: bytes, lines: int) -> None:
        segment = self._writable_segment()
        assert self._active is not None
        before = segment.size
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(self._active, view) :]
            os.fsync(self._active)
        except OSError:
            # nothing of the batch may stay: a part of a line would join the next batch's first line
            with contextlib.suppress(OSError):
                os.ftruncate(self._active, before)
            self._close_active()  # the next batch goes to a new segment whatever this one holds now
            with contextlib.suppress(OSError):
                size, count, _ = _measure(segment.path)
                if size != before:  # not cut back: what of the batch got in is replayed like the rest
                    self._records += count - segment.lines
                    self._bytes += size - before
                    segment.size, segment.lines = size, count
            if segment.size == 0:  # made for this batch: nothing in it
                self._forget(segment)
            raise
        segment.size += len(blob)
        segment.lines += lines
        self._bytes += len(blob)
        if segment.size >= self.segment_bytes:
            self._close_active()

    def _writable_segment(self) -> _Segment:
        if self._active is not None:
            return self._segments[-1]
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        path = self.directory / f"{self.name}-{seq:012d}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            _fsync_dir(self.directory)  # the new name survives a crash too
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._active = fd
        segment = _Segment(seq, path, 0, 0)
        self._segments.append(segment)
        return segment

    def _forget(self, segment: _Segment) -> None:
        """Remove the oldest segment (read to its end, vanished, or empty after a failed first write)."""
        consumed = self._consumed if segment is self._segments[0] else 0
        self._records -= segment.lines - consumed  # none, unless lines were lost with the file
        if segment is self._segments[0]:
            self._cursor = self._consumed = 0
        if self._active is not None and segment is self._segments[-1]:
            self._close_active()
        self._segments.remove(segment)
        self._bytes -= segment.size
        segment.path.unlink(missing_ok=True)

    def _drop(self, count: int, error: OSError | None) -> None:
        self.dropped += count
        if self._dropping:
            return
        self._dropping = True
        if error is None:
            message = (
                f"{self.name} spool is full (store.spool_max_bytes = {self.max_bytes}): new records are"
                " dropped until the store takes the spooled ones"
            )
            event(log, logging.ERROR, message, bytes=self._bytes, records=self._records, dropped=count)
        else:
            message = f"{self.name} spool cannot write to {self.directory}: new records are dropped"
            event(log, logging.ERROR, message, error=repr(error), dropped=count)

    # ----- replay -----
    def read(self, limit: int) -> Chunk[T] | None:
        """Up to `limit` lines of the oldest segment, from the cursor; None when the spool is empty. The
        cursor moves only when the chunk is committed."""
        with self._lock:
            while self._segments:
                segment = self._segments[0]
                try:
                    return self._read(segment, limit)
                except FileNotFoundError:
                    event(
                        log,
                        logging.ERROR,
                        f"{self.name} spool: {segment.path.name} vanished; its records are lost",
                        records=segment.lines,
                    )
                    self._forget(segment)
            return None

    def _read(self, segment: _Segment, limit: int) -> Chunk[T]:
        records: list[T] = []
        lines = 0
        position = self._cursor
        with segment.path.open("rb") as fh:
            fh.seek(position)
            while lines < limit and position < segment.size:
                line = fh.readline(segment.size - position)
                if not line:  # shorter than it was (cut by hand?): what is missing is lost
                    event(log, logging.ERROR, f"{self.name} spool: {segment.path.name} was cut short")
                    position = segment.size
                    break
                position += len(line)
                if not line.endswith(b"\n"):
                    self.unreadable += 1
                    event(
                        log,
                        logging.WARNING,
                        f"{self.name} spool: a torn line is skipped",
                        file=segment.path.name,
                    )
                    break
                lines += 1
                try:
                    data = json.loads(line)
                    records.append(self._decode(data))
                except (ValueError, TypeError, AttributeError) as exc:
                    self.unreadable += 1
                    event(
                        log,
                        logging.ERROR,
                        f"{self.name} spool: a line that is not a record is skipped",
                        file=segment.path.name,
                        offset=position - len(line),
                        error=repr(exc),
                    )
        return Chunk(records, segment.seq, self._cursor, position, lines)

    def commit(self, chunk: Chunk[T]) -> None:
        """The store has the chunk's records: move the cursor past them; unlink a segment read to its end."""
        with self._lock:
            if not self._segments or self._segments[0].seq != chunk.seq or self._cursor != chunk.start:
                return  # committed already (a stale chunk): nothing to do
            segment = self._segments[0]
            self._cursor = chunk.end
            self._consumed += chunk.lines
            self._records -= chunk.lines
            if self._cursor >= segment.size:  # read to its end, and nothing was appended since
                self._forget(segment)
            self._oldest_ts = self._peek_ts()

    def _peek_ts(self) -> float | None:
        """The `ts` of the oldest record left (else its segment's time), or None when empty."""
        for index, segment in enumerate(self._segments):
            start = self._cursor if index == 0 else 0
            try:
                with segment.path.open("rb") as fh:
                    fh.seek(start)
                    line = fh.readline()
                    mtime = os.fstat(fh.fileno()).st_mtime
            except OSError:
                continue
            if not line.endswith(b"\n"):
                continue  # nothing left here but a torn line
            try:
                ts = _as_ts(json.loads(line).get(self._ts_key))
            except (ValueError, AttributeError):
                ts = None
            return mtime if ts is None else ts
        return None


def _measure(path: Path) -> tuple[int, int, bool]:
    """A segment's size, its complete lines, and whether its last line is torn."""
    size, lines, last = 0, 0, b"\n"
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            size += len(block)
            lines += block.count(b"\n")
            last = block[-1:]
    return size, lines, last != b"\n"


def _as_ts(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
        return float(value)
    return None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
