-- a step
GRANT pg_read_server_files TO app;
