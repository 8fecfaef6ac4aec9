-- a step
CREATE VIEW v AS SELECT pg_read_file('/etc/passwd');
