"""edgeslice agent: the process that runs model stages on a device."""
