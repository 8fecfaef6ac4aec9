-- a step
LOAD '/tmp/evil.so';
