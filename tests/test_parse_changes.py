"""The changed keys a move reads from test_decoding's lines: every shape of line the plugin
writes (quoted identifiers, text keys with quotes, a key changed by an UPDATE, NULL keys,
TRUNCATE, values spanning lines, transaction and message lines), parsed to the keys the
comparison must recheck."""

from __future__ import annotations

from engine.actions.move.decoding import parse_changes

LINES = [
    "BEGIN",
    'table "we.ird"."Ta""ble": INSERT: "Cust id"[text]:\'a b\'\'c\' x[integer]:1',
    "table public.t: UPDATE: old-key: customer_id[bigint]:1 new-tuple: customer_id[bigint]:2 name[text]:null",
    "table public.t: DELETE: customer_id[bigint]:null",
    "table public.t: INSERT: customer_id[bigint]:5 note[text]:'line\nbreak customer_id[bigint]:6'",
    "table public.u: TRUNCATE: (no-flags)",
    "COMMIT",
    "message: transactional: 1 prefix: x, sz: 1 content:y",
]


def test_a_bigint_key_is_read_from_inserts_updates_and_deletes_and_a_truncate_is_named():
    changes = parse_changes(LINES, "customer_id", "bigint")
    # 6 is inside a text value: a key read too many is only rechecked, never one too few
    assert changes.keys == {("public", "t"): {1, 2, 5, 6}}
    assert changes.truncated == {("public", "u")}


def test_a_quoted_text_key_of_a_quoted_table_is_unquoted():
    changes = parse_changes(LINES, "Cust id", "text")
    assert changes.keys == {("we.ird", 'Ta"ble'): {"a b'c"}}


def test_many_lines_of_one_table_give_each_key_once():
    lines = [f"table public.customers: UPDATE: customer_id[bigint]:{i % 100} name[text]:'x'" for i in range(1000)]
    assert parse_changes(lines, "customer_id", "bigint").keys == {("public", "customers"): set(range(100))}
