"""Ahead-of-time compilation for Cloud TPU slices (`python -m pdjax.aot`): a program's per-chip memory, compile time
and cost from XLA's TPU compiler, on any machine with libtpu, before the slice is rented."""
