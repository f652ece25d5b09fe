"""Running a fleet on one machine: local broker, link emulation, testbed, fleet launcher, demo,
simulator, and the one process supervisor. It may import every other package; none imports it."""
