"""Who is calling: Ed25519-signed JWTs issued here or by an external identity provider."""
