-- password=Sup3rS3cret-Hunter2
CREATE TABLE t (id bigint PRIMARY KEY);
