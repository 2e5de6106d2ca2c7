"""Measurement: answer checking, accuracy and fidelity runs, speed benchmarks, attention traces."""
