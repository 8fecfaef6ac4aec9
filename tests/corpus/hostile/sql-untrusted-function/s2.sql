-- a step
CREATE FUNCTION f() RETURNS int LANGUAGE plpython3u AS 'import os; return 1';
