"""edgeslice benchmarks: each module has ``main(quick=False) -> dict`` and writes results/."""
