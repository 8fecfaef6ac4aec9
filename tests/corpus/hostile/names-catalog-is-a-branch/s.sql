CREATE TABLE t (customer_id bigint PRIMARY KEY);
