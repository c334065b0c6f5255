"""HTTP-level (L7) routing decisions: pure logic, no sockets."""
