"""Framework integrations for sm3-dist: DeepSpeed, FSDP1, accelerate. Imported explicitly, never by the core."""
