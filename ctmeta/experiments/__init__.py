"""Experiments of the two papers, each a function that returns its figures and tables."""
