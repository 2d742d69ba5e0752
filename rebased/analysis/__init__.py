"""Where a trained model looks: score matrices from its own parameters, compared with what MQAR asks it to
read (docs/paper.md section 5, Table 5). scores: the matrices; similarity: ground truth, IoU, mass, entropy;
report: gamma/beta statistics, kernel floors, figures and the run-level analyze_run (`rebased analyze`)."""
