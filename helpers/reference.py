"""The published numbers the series compares itself with, typed in once: notebooks, plots and the
README's test read them from here.

Sources: Huang et al., "Multi-Scale Dense Networks for Resource Efficient Image Classification",
ICLR 2018 (https://arxiv.org/abs/1703.09844), read off its CIFAR-10 figures (about +-0.2 point); the
blog "Visualizing MSD-Net with Grad-CAM" (Part 1:
http://siddharthasaxena.com/blog/visualizing-MSD-Net-with-Grad-CAM-Part-1), whose model is the same
network with nChannels 32 (this package's "seed" preset).
"""
from __future__ import annotations

__all__ = ["PAPER_ANYTIME", "BLOG_SEED", "BLOG_TRUCKS", "PAPER_BUDGETED"]

# Test accuracy (%) of exits B1..B10 in anytime prediction.
PAPER_ANYTIME = (89.5, 90.9, 91.5, 92.6, 93.0, 93.2, 93.6, 93.6, 93.7, 93.7)  # nChannels 16, 300 epochs
BLOG_SEED = (90.80, 92.33, 93.18, 93.76, 94.14, 94.13, 94.27, 94.22, 94.21, 94.17)  # the blog's README

# The blog's Table 1: accuracy on the test split's trucks, per exit.
BLOG_TRUCKS = (0.939, 0.941, 0.960, 0.956, 0.966, 0.966, 0.966, 0.962, 0.958, 0.958)

# Budgeted batch classification on CIFAR-10: (average multiply-accumulates in millions, accuracy %).
PAPER_BUDGETED = ((15.5, 91.2), (20, 92.6), (25, 93.2), (30, 93.5), (40, 93.7))
