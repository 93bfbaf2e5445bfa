"""Gadget sources: one folder per gadget, plus the shared readers."""
