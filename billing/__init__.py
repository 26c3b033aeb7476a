"""Pure billing domain: money, periods and the pricing engine. No I/O, no clock, nothing of ours imported."""
