"""Doorstep device package."""
