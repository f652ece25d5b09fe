"""edgeslice planner: profiles models, plans partitions, serves artifacts and runs inference clients."""
