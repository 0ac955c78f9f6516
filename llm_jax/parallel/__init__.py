"""Where the devices are: the mesh and the logical-axis rules (sharding.py), multi-process start-up (distributed.py)."""
