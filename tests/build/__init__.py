"""Tests of diffexp/build/."""
