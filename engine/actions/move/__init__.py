"""Moving rows online with PostgreSQL's logical replication: what splits, merges and relocations
share, as stages.

A move is a set of links, each from a source shard to a target shard with an optional hash
range filter (spec.py). Its stages, each a small unit that takes the live move (live.py: the
apply context, the journal, held connections) and what the stage before handed on, and
returns a new frozen value; `stages.py` lists them as data and its evaluator visits each by
kind. The journal step each writes is in quotes:

  record     "record": targets enter the catalog as 'moving' (not routed)              prepare.py
  targets    "targets": target databases created with the database's schema steps, and given
             their copy of the reference tables (engine/actions/reference.py; the move itself
             leaves reference tables out of its publications, comparison and fence)
  publish    "publish": per link, a row-filtered publication and an explicit logical slot
  subscribe  "subscribe": per link, a subscription on the target (create_slot = false)
  guard      "guard": per source table, statement triggers that refuse writes once the fence
             is armed and a deferred one that refuses the commit of a transaction that wrote
             before it (one table per short transaction, while the copy runs)
  follow     "follow <branch>": per replica of the database, a disabled link to each target
  sync       "sync": wait until every table is copied and the slots' lag is small        sync.py
  compare    "compare": every row compared while writes go on; hands on the Comparison
                                                                                     compare.py
  converge   "converge": the lag small again; then what the flip and the fence need is read,
             and the last key rounds run (not journaled) while the slots are decoded as they
             are written (decoding.py)
  fence      "fence": arm the guard (a flag: no table lock), then drain (the commits under
             way) and mark in one statement on the server; hands on the marks and the pause
             (engine/actions/fence.py: why it is sound); once drained, the sources' side of
             the keys left is read (compare.py Ahead) and the targets' sequences are set past
             the sources' in disjoint blocks (sequences.py), beside the marks and the catch-up
                                                                                    fencing.py
  catch up   "catch up": targets apply up to the mark; the sources' last changes taken from
             the decoder                                                            cutover.py
  verify     "verify": the keys left and those changed since, frozen sources vs targets
             (the targets' side, beside Ahead's; the sources' side of what Ahead did not read);
             then the sequences' setting waited for
  flip       "flip": targets active, sources retired, new routing epoch (one transaction);
             then the pause recorded into the flip's history row
  hand over  "hand over <branch>": per replica, the links to the targets enabled, those to the
             sources removed (engine/actions/replica.py says why it is exact)        cleanup.py
  cleanup    "cleanup": subscriptions, slots and publications removed

Steps behind the fence (fence, catch up, verify, flip) journal with durable=False: lost with
the catalog they only mean the step runs again; the flip's transaction is durable and flushes
them. Names of everything created derive from the operation id (shardctl_op<id>_<n>), so a
resumed or aborted operation finds exactly what it made. Identifiers go through psycopg.sql.

Why resuming from the journal is sound. Which stages run is read from the journal
(stages.recorded, stages.stages_for), never from an object that outlived a crash:

- Past the cutover (the flip's journal row, which commits in the flip's own catalog
  transaction, or the routing itself: journal.CUT_OVER), only hand over and cleanup are left,
  and both are idempotent. The targets own the range and take writes; the source is no longer
  the truth, so nothing before the flip may run again, and an abort refuses.
- Before it, every stage runs again from the top. Each of record, targets, publish,
  subscribe, guard and follow checks what exists before it acts and finds its work done. Sync
  reads the servers, not a previous run's figures. Compare starts afresh (a new verification
  slot): no key settled by a dead run is trusted. A fence the dead run left is found on the
  sources (fence.armed_for): kept, and the pause counts from it; the catch-up and verify run
  behind it as if this run had armed it. So a crash at any step leaves either a state a rerun
  completes, or one an abort undoes without touching the source's data.

A crash of any PostgreSQL server cannot break this either: a server that does not answer
during cleanup or abort is "not done yet" (what it holds is listed, the operation stays open);
subscription errors count from the moment the current step began, not since the link was made.
Behind the fence every wait is bounded by `moves.fence_timeout`: each statement on the move's
connections (statement_timeout), each wait for a thread's result, the catch-up and the flip's
transaction. An overrun lifts the fence (the source takes writes again), the journal's step
says what did not finish, and the operation stays open for `apply` to resume.

This package's __init__ imports nothing: callers import the module they need (start, stages,
cleanup, spec), and no module here imports one that imports it back.
"""
