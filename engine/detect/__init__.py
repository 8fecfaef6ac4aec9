"""Detection: hot and cold shards from sample windows, with evidence; cooldowns and limits."""
