-- a step
CREATE DATABASE other;
