"""Tasks, one folder each, files named by role: mqar/ (the associative-recall benchmark)."""
