"""What a run folder becomes: leaderboards, paper figures and the regression gate; they read the run folder, never the live registries."""
