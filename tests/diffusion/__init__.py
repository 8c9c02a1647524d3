"""Tests of diffexp/diffusion/."""
