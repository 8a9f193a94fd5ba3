"""bastion.hardware — know the machine: probe, device profiles, planner, engine cache keys."""
