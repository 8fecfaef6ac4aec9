CREATE TABLE t (account bigint PRIMARY KEY);
