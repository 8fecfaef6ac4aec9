-- a step
CREATE EXTENSION dblink;
