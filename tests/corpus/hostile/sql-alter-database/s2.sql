-- a step
ALTER DATABASE postgres SET work_mem = '1GB';
