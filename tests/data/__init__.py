"""Tests of diffexp/data/."""
