-- a step
CREATE TABLESPACE ts LOCATION '/tmp';
