CREATE TABLE ok (customer_id bigint PRIMARY KEY);

CREAT TABLE x;
