"""Backbone features computed once and reused: the in-run cache (`cache`: when a phase can
train its heads from stored features, and the loaders over them) and the on-disk store shared
by every run, sweep, `lr-find`, `rank` and `eval` (`store`). See docs/feature_cache.md."""

from transferkit.features.cache import (
    CachedFeatures,
    build_cache,
    cache_decision,
    shard_rows,
    why_not_cacheable,
)
from transferkit.features.store import FeatureStore, backbone_id, cache_root, shared_cache

__all__ = [
    "CachedFeatures",
    "FeatureStore",
    "backbone_id",
    "build_cache",
    "cache_root",
    "cache_decision",
    "shard_rows",
    "shared_cache",
    "why_not_cacheable",
]
