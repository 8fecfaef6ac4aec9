"""Servers: embedded server lifecycle and connections to declared servers."""
