"""Doorstep ble package."""
