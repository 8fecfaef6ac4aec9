-- a step
CREATE FUNCTION f() RETURNS int LANGUAGE c AS '/tmp/evil.so', 'f';
