"""Figures: training curves (paper Figure 4)."""
