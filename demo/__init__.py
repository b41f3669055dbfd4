"""``doorstep demo``: the whole system on one machine (issue 8), and the process stack it runs."""
