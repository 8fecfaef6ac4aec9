"""`python -m engine` is the same command as `shardctl`."""

from engine.cli import main

main()
