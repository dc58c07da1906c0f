"""Moved to :mod:`advfeat.checkpoint` (one checkpoint module below ``methods``, ``train`` and
``eval``); this name re-exports it."""

from advfeat.checkpoint import (
    FORMAT,
    LEGACY_FORMATS,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    checkpoint_digest,
    content_digest,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)

__all__ = [
    "FORMAT",
    "LEGACY_FORMATS",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "checkpoint_digest",
    "content_digest",
    "load_checkpoint",
    "remove_stale_temporaries",
    "save_checkpoint",
]
