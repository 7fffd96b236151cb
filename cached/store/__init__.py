"""The node's content-addressed store (blobs, partial blobs, manifests, refs, views, claims)."""

from cached.store.space import Reservation
from cached.store.store import ModelRecord, Store

__all__ = ["ModelRecord", "Reservation", "Store"]
