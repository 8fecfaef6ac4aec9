"""Observation: the catalog, introspection of the real servers, and (later) load metrics."""
