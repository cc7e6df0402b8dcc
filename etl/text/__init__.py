"""Texts: the banks, TextSpan and the labelers."""
