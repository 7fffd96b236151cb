"""The node's content-addressed store (blobs, partial blobs, manifests, refs, views, claims)."""

from cached.store.store import ModelRecord, Reservation, Store

__all__ = ["ModelRecord", "Reservation", "Store"]
