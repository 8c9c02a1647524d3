"""Tests of diffexp/metrics/."""
