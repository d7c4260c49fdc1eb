"""Latency-aware pruning: measured layer costs on a target runtime, width choice, and the not-slower guarantee."""
