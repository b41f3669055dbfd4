"""Doorstep hub package."""
