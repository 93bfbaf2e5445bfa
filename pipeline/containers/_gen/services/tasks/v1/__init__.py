"""Generated; see the parent package."""
