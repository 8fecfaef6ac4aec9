"""The watch daemon: `shardctl watch` keeps a fleet in shape within its policy.

Layering (enforced by tests/test_layering.py): `autonomy` is pure (a plan in, a decision out);
`view` holds the frozen snapshot the loops publish; `http`, `prometheus` and the dashboard
renderer read only that snapshot and never import the database layer; `daemon` is the one
module that wires loops, catalog, leader lock and apply together.
"""
