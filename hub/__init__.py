"""The hub: onboarded by the phone as a device, then a commissioner for other devices (issue 7)."""
