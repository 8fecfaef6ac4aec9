-- a step
ALTER ROLE postgres NOSUPERUSER;
