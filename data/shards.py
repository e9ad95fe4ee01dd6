"""Reading webdataset shards safely: open, stream members, group them into records.

Only image, `.txt` and `.json` members are read at all; everything else (`.pyd`, `.pkl`, `.pth`, ...)
is skipped unread, so nothing from a shard is ever unpickled. Keys stay strings: they are never
turned into file paths. A read error (a truncated or corrupt shard) ends the shard after the
samples read so far, with one bad record that says where it was cut.
"""

from __future__ import annotations

import json
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import IO
from urllib.parse import urlparse

from webdataset import gopen as wds_gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from data.config import DataConfig, DataConfigError
from data.sample import RawRecord

READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, ValueError)


def open_shard(location: str, *, allow_pipe_urls: bool) -> IO[bytes]:
    """Open a local path, file:// or remote URL for reading; `pipe:` only when explicitly allowed."""
    if location.startswith("pipe:"):
        if not allow_pipe_urls:
            raise DataConfigError(f"Refusing pipe: shard {location!r}; set --data.allow-pipe-urls True if you trust it.")
        return wds_gopen.gopen_pipe(location, "rb")
    scheme = urlparse(location).scheme
    if len(scheme) <= 1:  # a plain path (a one-letter scheme is a Windows drive)
        return open(location, "rb")
    if scheme == "file":
        return open(urlparse(location).path, "rb")
    handler = wds_gopen.gopen_schemes.get(scheme)
    if handler is None or scheme == "pipe":
        raise DataConfigError(f"Shard {location!r}: no reader for URL scheme {scheme!r}.")
    # Called directly, not through wds gopen(), so GOPEN_REWRITE cannot turn this URL into a pipe.
    return handler(location, "rb")


def shard_name(location: str) -> str:
    """The shard's file name (stable whether it is read locally or from a URL)."""
    return PurePosixPath(urlparse(location).path if "://" in location else location).name


def iter_shard_records(location: str, cfg: DataConfig) -> Iterator[RawRecord]:
    """Records of one shard in stored order. Errors become bad records, never exceptions."""
    wanted = {ext.lower() for ext in cfg.image_extensions} | {"txt", "json"}

    def select(name: str) -> bool:
        _, ext = base_plus_ext(name)
        return ext is not None and ext.lower() in wanted

    try:
        stream = open_shard(location, allow_pipe_urls=cfg.allow_pipe_urls)
    except (OSError, DataConfigError) as e:
        yield RawRecord(key="<shard>", origin=location, problem=("unreadable_shard", f"{type(e).__name__}: {e}"))
        return
    key, members = None, {}
    try:
        for member in tar_file_iterator(stream, select_files=select):
            member_key, ext = base_plus_ext(member["fname"])
            ext = ext.lower()
            if member_key != key:
                if members:
                    yield record_from_members(key, members, location, cfg)
                key, members = member_key, {}
            if ext in members:
                members["__duplicate__"] = ext.encode()
            members[ext] = member["data"]
        if members:
            yield record_from_members(key, members, location, cfg)
    except READ_ERRORS as e:
        # Keep what was read before the cut; the sample in progress only holds complete members.
        if members:
            yield record_from_members(key, members, location, cfg)
        yield RawRecord(key=f"{key}+", origin=location, problem=("truncated_shard", f"read error after key {key!r}: {e}"))
    finally:
        stream.close()


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
