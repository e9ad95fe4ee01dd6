"""The bottom layer every package may import (and which imports nothing of the project): durable
file writes with their hashes, and derived random seeds. One copy of each, used by all stages."""

from foundation.files import (
    atomic_folder,
    fsync_dir,
    fsync_file,
    fsync_tree,
    remove_stale_siblings,
    sha256_bytes,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
)
from foundation.seeds import derived_seed

__all__ = [
    "atomic_folder",
    "derived_seed",
    "fsync_dir",
    "fsync_file",
    "fsync_tree",
    "remove_stale_siblings",
    "sha256_bytes",
    "sha256_file",
    "write_bytes_atomic",
    "write_json_atomic",
]
