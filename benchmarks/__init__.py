"""Benchmarks of lifelong editing: LEMoE against the baselines a user would pick instead (see BENCHMARKS.md)."""
