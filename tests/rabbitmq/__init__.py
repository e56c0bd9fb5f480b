"""What only a real broker shows: faults, clusters, the wire, alarms, stalls, forgeries."""
