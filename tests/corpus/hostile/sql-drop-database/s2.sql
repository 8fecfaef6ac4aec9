-- a step
DROP DATABASE postgres;
