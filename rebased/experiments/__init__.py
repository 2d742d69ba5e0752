"""The paper's sweeps as Python: functions that return lists of runs."""
