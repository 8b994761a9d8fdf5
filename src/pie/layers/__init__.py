"""Building blocks shared by all model families (norm, rotary, fused linears, attention, MLP, decoder)."""
