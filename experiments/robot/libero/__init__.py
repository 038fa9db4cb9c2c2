"""LIBERO evaluation (DESIGN §5): environments, observation preprocessing, and the eval entry point."""
