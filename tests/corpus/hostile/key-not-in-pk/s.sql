CREATE TABLE t (customer_id bigint, id bigint PRIMARY KEY);
