"""Reading webdataset shards safely: open, stream members, group them into records.

Only image, `.txt` and `.json` members are read at all; everything else (`.pyd`, `.pkl`, `.pth`, ...)
is skipped unread, so nothing from a shard is ever unpickled. Keys stay strings: they are never
turned into file paths. A read error (a truncated or corrupt shard) ends the shard after the
complete samples read so far, with one bad record that says where it was cut.
"""

from __future__ import annotations

import gzip
import json
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import IO
from urllib.parse import urlparse

from webdataset.gopen import gopen_pipe, gopen_schemes
from webdataset.tariterators import base_plus_ext

from data.config import DataConfig, DataConfigError
from data.sample import RawRecord

GZIP_SUFFIXES = (".gz", ".tgz")
READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, ValueError)


def open_shard(location: str, *, allow_pipe_urls: bool) -> IO[bytes]:
    """Open a local path, file:// or remote URL for reading; `pipe:` only when explicitly allowed."""
    if location.startswith("pipe:"):
        if not allow_pipe_urls:
            raise DataConfigError(f"Refusing pipe: shard {location!r}; set --data.allow-pipe-urls True if you trust it.")
        return gopen_pipe(location, "rb")
    scheme = urlparse(location).scheme
    if len(scheme) <= 1:  # a plain path (a one-letter scheme is a Windows drive)
        return open(location, "rb")
    if scheme == "file":
        return open(urlparse(location).path, "rb")
    handler = gopen_schemes.get(scheme)
    if handler is None or scheme == "pipe":
        raise DataConfigError(f"Shard {location!r}: no reader for URL scheme {scheme!r}.")
    # Called directly, not through wds gopen(), so GOPEN_REWRITE cannot turn this URL into a pipe.
    return handler(location, "rb")


def shard_name(location: str) -> str:
    """The shard's file name (stable whether it is read locally or from a URL)."""
    return PurePosixPath(urlparse(location).path if "://" in location else location).name


class _CountingReader:
    """Counts the bytes a tar stream delivered and whether it ended, to spot a cut between members.

    Python's tarfile treats a missing or partial header as the end of the archive, so a shard cut
    at a member boundary would read as complete. A real end has a 512-byte zero block after the
    last member; a stream that ends before one was cut.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.bytes_read, self.ended = raw, 0, False

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.bytes_read += len(data)
        self.ended = self.ended or (not data and size != 0)
        return data


def iter_tar_members(stream: IO[bytes], wanted: set[str], gzipped: bool) -> Iterator[tuple[str, str, bytes]]:
    """(key, lower-case extension, bytes) of the regular members whose extension is wanted; the
    others are skipped unread. Raises tarfile.ReadError when the stream was cut."""
    reader = _CountingReader(gzip.GzipFile(fileobj=stream) if gzipped else stream)  # type: ignore[arg-type]
    tar = tarfile.open(fileobj=reader, mode="r|")  # type: ignore[call-overload]
    for info in tar:
        key, ext = base_plus_ext(info.name)
        if info.isreg() and key is not None and ext.lower() in wanted:
            try:
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
            except READ_ERRORS as e:
                raise ShardCut(f"{e} in member {info.name!r}", next_key=key) from e
            yield key, ext.lower(), data
        tar.members = []  # stream mode: keep no TarInfo history
    if reader.ended and reader.bytes_read < tar.offset + tarfile.BLOCKSIZE:
        raise ShardCut(f"the shard ends at byte {reader.bytes_read} without the end-of-archive block")


class ShardCut(tarfile.ReadError):
    """The shard stream ended early. `next_key`: the key whose member was cut, when known; the
    sample before it is then known to be complete."""

    def __init__(self, message: str, next_key: str | None = None) -> None:
        super().__init__(message)
        self.next_key = next_key


def iter_shard_records(location: str, cfg: DataConfig) -> Iterator[RawRecord]:
    """Records of one shard in stored order. Errors become bad records, never exceptions."""
    wanted = {ext.lower() for ext in cfg.image_extensions} | {"txt", "json"}
    try:
        stream = open_shard(location, allow_pipe_urls=cfg.allow_pipe_urls)
    except (OSError, DataConfigError) as e:
        yield RawRecord(key="<shard>", origin=location, problem=("unreadable_shard", f"{type(e).__name__}: {e}"))
        return
    key, members = None, {}
    try:
        for member_key, ext, data in iter_tar_members(stream, wanted, location.lower().endswith(GZIP_SUFFIXES)):
            if member_key != key:
                if members:
                    yield record_from_members(key, members, location, cfg)
                key, members = member_key, {}
            if ext in members:
                members["__duplicate__"] = ext.encode()
            members[ext] = data
        if members:
            yield record_from_members(key, members, location, cfg)
    except READ_ERRORS as e:
        # The samples before the cut were yielded already. The one in progress is kept only if the
        # cut is known to lie in the next sample; otherwise it may miss members (its caption, say).
        if members and isinstance(e, ShardCut) and e.next_key not in (None, key):
            yield record_from_members(key, members, location, cfg)
            key, members = e.next_key, {}
        if key is None:  # not a single member: the shard itself could not be read
            yield RawRecord(key="<shard>", origin=location, problem=("unreadable_shard", f"{type(e).__name__}: {e}"))
        else:
            lost = f"sample {key!r} and the rest of the shard" if members else "the rest of the shard"
            yield RawRecord(key=key, origin=location, problem=("truncated_shard", f"read error, lost {lost}: {e}"))
    finally:
        try:
            stream.close()
        except OSError:  # a failed download's exit status; the read error above already counted it
            pass


def record_from_members(key: str, members: dict[str, bytes], location: str, cfg: DataConfig) -> RawRecord:
    """Group of members -> record: first image extension in config order, `.txt`, `.json` metadata."""
    record = RawRecord(key=key, origin=location)
    if "__duplicate__" in members:
        record.problem = ("duplicate_member", f"two .{members['__duplicate__'].decode()} members for one key")
        return record
    record.image = next((members[ext] for ext in cfg.image_extensions if ext in members), None)
    if "json" in members:
        try:
            metadata = json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            record.problem = ("bad_json", f"the .json member is not valid JSON ({e})")
            return record
        if not isinstance(metadata, dict):
            record.problem = ("bad_json", "the .json member is not an object")
            return record
        record.metadata = metadata
    if "txt" in members:
        record.caption = members["txt"]
    else:
        record.caption = record.metadata.get(cfg.caption_column)
    return record
