"""Differential privacy: the DP SQL engine (plan, mechanisms, DuckDB adapter), DP queries and DP mock data."""
