"""Scheduling policy as plain objects, no sockets and no tasks: what waits (`queue`), who gets it
(`placement`), and which worker already holds a prompt's prefix (`prefix`)."""
