"""NAT traversal for the QUIC endpoint: address discovery (STUN), connectivity checks (hole
punching), candidate gathering and path choice. Protocol logic is sans-I/O (`stun`, `candidates`);
`reach` binds it to an endpoint's socket."""
