"""forgetless."""
