"""The harness: suites, model zoo and training, runner, store, leaderboard, figures and the
regression gate. ``python -m benchmarks.run --help`` is the entry point."""
