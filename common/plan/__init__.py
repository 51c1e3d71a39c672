"""Before a run: which machine this is, what a run will cost (memory, time, disk), what is wrong now."""
