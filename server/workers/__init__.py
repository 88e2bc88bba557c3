"""The worker side of the front: who the workers are (registry), how their states move with their
messages and the clock (lifecycle, with each worker's breaker), the ZeroMQ pump that carries
messages both ways (pump), and who may connect (zap)."""
