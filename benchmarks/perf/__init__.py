"""Speed and memory measurements of methods, metrics and training, beside other libraries (scripts, not tests)."""
