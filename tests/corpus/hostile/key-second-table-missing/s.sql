CREATE TABLE t (customer_id bigint PRIMARY KEY);


CREATE TABLE audit (id bigint PRIMARY KEY);
