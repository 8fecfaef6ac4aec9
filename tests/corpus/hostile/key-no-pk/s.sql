CREATE TABLE t (customer_id bigint);
