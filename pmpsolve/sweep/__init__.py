"""The sweeps: state forward and co-state backward in time, and what they integrate with."""
