"""Datasets: public cards with privacy metadata, and immutable versions uploaded by stewards."""
