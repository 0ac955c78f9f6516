"""Training, the same for every task: the host loop (loop.py) over a run built once (setup.py), the pure
step (step.py) on a sharded state (state.py) with its optimizer (optim.py), checkpoints and exports
(checkpoint.py, export.py), preemption (preemption.py), TensorBoard events (events.py) and FLOPs/MFU
(metrics.py)."""
