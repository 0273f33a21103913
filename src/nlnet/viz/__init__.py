"""Figures: attention maps drawn on frames (paper Figure 3) and training curves (Figure 4)."""
