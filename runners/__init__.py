"""Execution backends behind one small interface (the local Docker engine first)."""
