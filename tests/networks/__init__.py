"""Tests of diffexp/networks/."""
