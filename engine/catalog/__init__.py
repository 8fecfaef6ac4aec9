"""The catalog: the control database's schema and migrations, reads and writes, the apply
lock, the operation journal, and the routing function."""
