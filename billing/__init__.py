"""Pure billing domain: money, periods, tariffs and the pricing engine. No I/O, no clock, nothing of ours imported."""
