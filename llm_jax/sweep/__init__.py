"""Sweeps: one experiment at several settings (plan.py), launched and resumed (run.py), with TensorBoard
HParams (hparams.py) and a report (report.py)."""
