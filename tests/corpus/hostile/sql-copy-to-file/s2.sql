-- a step
COPY (SELECT 1) TO '/tmp/out.csv';
