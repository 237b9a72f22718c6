"""Edge tier runtime: text featurization and small INT8 model backends."""
