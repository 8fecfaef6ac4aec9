ALTER TABLE t ALTER COLUMN customer_id TYPE text;
