"""The data path: the object store and every S3 key layout, data sources, sharding, manifests."""
