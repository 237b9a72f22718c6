"""Cloud tier runtime."""
