"""Doorstep phone package."""
