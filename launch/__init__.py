"""Layer 0: how a process starts and what it knows (config, distributed env, logging, checkpoint IO, seeding)."""
