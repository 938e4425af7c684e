"""The user's shell tools: CLI, local stack, template reader, demo, report."""
