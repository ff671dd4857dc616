"""Benchmarks: workloads, runners for moespec and peers, JSON reports."""
