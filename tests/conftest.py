"""8 fake CPU devices for every test: set before JAX is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is mostly compilation, which one malloc arena slows by ~25% (many compile threads); it only makes
# steps faster. tests/test_runtime.py turns it on where it is tested.
os.environ.setdefault("LLM_JAX_MALLOC", "system")
