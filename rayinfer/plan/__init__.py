"""The plan: a job spec resolved and checked before Ray starts (``job``), and cut into work units (``work``, ``retry``)."""
