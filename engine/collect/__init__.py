"""Collection: reading the fleet and the catalog into observations (engine/observe's values) and
keeping them: the observer, metric sampling and its collectors, the history of samples, the
schema cache. The half of observing that reaches a database; what it produces is engine/observe's."""
