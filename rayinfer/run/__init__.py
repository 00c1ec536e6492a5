"""Running a planned job on Ray: the driver, the actor and its unit loop, failures, progress."""
