-- a step
SET ROLE postgres;
