"""Tests of diffexp/training/."""
