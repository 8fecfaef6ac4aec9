"""Planning: the plan model, the planner (desired vs observed), and saved plan files."""
