-- a step
CREATE LANGUAGE plpython3u;
