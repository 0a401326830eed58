"""Where examples come from and in what order they are seen."""
