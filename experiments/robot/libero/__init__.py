"""LIBERO evaluation (docs/DESIGN.md §5): environments, observation preprocessing, and the eval entry point."""
