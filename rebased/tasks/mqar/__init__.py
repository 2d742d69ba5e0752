"""MQAR, multi-query associative recall: the Zoology generator (data.py), the paper's grids as Python
(grids.py), the paper's reported values (paper_values.py), and the sweep that trains, evaluates,
summarises and plots a grid (sweep.py)."""
