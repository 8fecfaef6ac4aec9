"""Executors: one module per action kind, each journaled; `execute` dispatches by type."""
