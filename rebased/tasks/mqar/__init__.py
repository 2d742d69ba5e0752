"""MQAR, multi-query associative recall: the Zoology generator (data.py), the paper's grids as Python
(grids.py), the paper's reported values (paper_values.py), the sweep that trains and evaluates a grid
(sweep.py), and what its results say: summary, paper comparison, figure (report.py)."""
