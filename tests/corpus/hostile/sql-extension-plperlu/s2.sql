-- a step
CREATE EXTENSION plperlu;
