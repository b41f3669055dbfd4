"""Doorstep bluezsim package."""
