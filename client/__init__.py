"""The inference client: the Python API and `edgeslice infer`, replica choice, fleet monitor."""
