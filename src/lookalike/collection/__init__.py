"""A folder's persistent, incremental index: SQLite metadata, raw descriptors, a faiss index."""

from lookalike.collection.collection import Collection, CollectionInfo, SearchHit
from lookalike.collection.sync import SyncProgress, SyncReport

__all__ = ["Collection", "CollectionInfo", "SearchHit", "SyncProgress", "SyncReport"]
