"""TrinityX-DS."""
