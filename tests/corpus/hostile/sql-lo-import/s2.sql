-- a step
SELECT lo_import('/etc/passwd');
