-- a step
COPY t FROM '/etc/passwd';
