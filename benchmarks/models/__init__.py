"""The model zoo (architectures adapted to each dataset, with their target layers) and training with its cache."""
