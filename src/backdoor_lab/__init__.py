"""backdoor_lab."""
