"""Models shipped inside the package (see tiny_moe.py)."""
