"""shardctl: declarative sharding, resharding and dev branches for PostgreSQL."""

__version__ = "0.1.0"
