"""Shared-context multi-turn workload (SCBench-style), its HTTP benchmark runner and reliability checks
against real SGLang servers. See README.md in this folder for the commands."""
