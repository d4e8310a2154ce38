"""Differential privacy: the DP SQL engine, budgets and DP mock data."""
