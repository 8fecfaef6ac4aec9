-- a step
ALTER SYSTEM SET shared_preload_libraries = 'evil';
