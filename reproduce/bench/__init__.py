"""The benchmarks: `reproduce bench` (overhead.py: train.py against a bare loop),
`reproduce bench-loaders` (loaders.py: FFCV against torchvision's DataLoader) and
`reproduce bench-matrix` (matrix.py: images/s over precision, memory format, compile and
input) and `reproduce plan` (plan.py: each experiment's wall time and device-hours from steps
measured here; its arithmetic in projection.py). They share harness.py: the bare loop, device
sync, timing and the peak matmul rate.

Importing this package imports none of them.
"""
