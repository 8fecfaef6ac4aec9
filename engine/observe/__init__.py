"""Observations as values: what the catalog and the servers were seen to hold, metric samples and
their series, and the pure readings of them (introspection queries, replication names, strays).
Reading them from the fleet is engine/collect's; planning and detection build on these."""
