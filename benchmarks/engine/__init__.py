"""The run core: suites, the plan, running a (model, dataset) group, executors and the run store."""
