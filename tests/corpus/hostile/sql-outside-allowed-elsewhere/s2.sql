COPY t FROM '/srv/seed.csv';
