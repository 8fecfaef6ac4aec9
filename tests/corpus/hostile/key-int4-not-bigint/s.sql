CREATE TABLE t (customer_id integer PRIMARY KEY);
