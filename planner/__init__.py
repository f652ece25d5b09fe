"""edgeslice planner: profiles models, plans partitions, serves artifacts, runs clients."""
