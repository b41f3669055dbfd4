"""Doorstep cloud package."""
