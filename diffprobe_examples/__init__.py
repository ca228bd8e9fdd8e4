"""Example models and helpers for diffprobe's tests, benchmarks and tutorials (not part of the
library's API): models saved the way users ship them, and small trained networks."""
