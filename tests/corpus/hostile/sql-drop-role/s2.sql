-- a step
DROP ROLE IF EXISTS app;
