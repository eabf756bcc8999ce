"""Local health: checks that probe the service, and the gate that decides on them."""
