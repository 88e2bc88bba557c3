"""What the tests and the benchmarks both drive: a cluster of real processes started as
`honcho start` starts them (cluster), the load client (load), the fault-injection environment
(chaos) and raw-socket clients of the front (connections). Not part of the installed product."""
