"""Model configs (Hugging Face ``config.json`` form) the planner and the step benchmark build from."""
