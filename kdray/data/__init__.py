"""Data: dataset builders (files, Parquet shards, text), shifts, transforms, streaming and lineage."""
