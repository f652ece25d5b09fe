"""Built-in models (random weights from a fixed seed) used by the demo, tests and benchmarks."""
