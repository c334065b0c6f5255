"""The L7 runtime: the hand-off listener (asyncio) that reads request heads
and answers or forwards them, HTTP/1.1 framing, the kernel splice, endpoint
choice and the fd store that carries connections across restarts. The tables
it routes with are compiled in kmesh.config.http."""
