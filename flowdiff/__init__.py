"""flowdiff."""
