"""Domain core: configuration, models, the rules of SPEC §5 and the MongoDB store. No Temporal."""
