"""Pure billing domain: money, periods and tariffs. No I/O, no clock, nothing of ours imported."""
